"""Services: the logic behind the routes, each given its dependencies in its constructor."""
