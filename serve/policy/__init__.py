"""serve's side of operator policies: the reload fan-out across replicas and the `policy` CLI.

The rules, their loading and the engine that enforces them live in `core.policy`, shared with align (which
checks generated samples for compliance and passes corrections through the same rules before training).
"""
