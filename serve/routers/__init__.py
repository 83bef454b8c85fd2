"""Routers: translate HTTP to service calls and back; no logic of their own."""
