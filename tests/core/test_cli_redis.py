"""`command_redis`: every command that needs Redis says why it cannot have it in one line and exits 1.

The core's `versions`, serve's `keys` and `data replay-spool` share it (core/cli_redis.py); the failure is forced
by making `resolve_redis` raise what it raises when serve's private Redis does not come back in time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import core.cli_redis
from core.cli import app
from core.redis_server import RedisServerError

REASON = "the private Redis in var/redis did not come back within 30s"


@pytest.fixture(autouse=True)
def no_redis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unavailable(settings: object) -> tuple[str, None]:
        raise RedisServerError(REASON)

    monkeypatch.setattr(core.cli_redis, "resolve_redis", unavailable)
    monkeypatch.setenv("SECONDSTAGE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SECONDSTAGE_REDIS_URL", raising=False)
    (tmp_path / "var" / "spool" / "serve-0").mkdir(parents=True)


@pytest.mark.parametrize(
    "args",
    [
        ["versions", "list"],
        ["versions", "activate", "base"],
        ["keys", "list"],
        ["data", "replay-spool", "--replica", "serve-0"],
    ],
)
def test_a_command_without_redis_says_why_in_one_line_and_exits_1(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, terminal_width=300)
    assert result.exit_code == 1, result.output
    assert REASON in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
