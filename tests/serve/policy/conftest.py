"""The policy engine's fixtures (tests/core/policy) for serve's policy router and CLI tests."""

from tests.core.policy.conftest import make_engine

__all__ = ["make_engine"]
