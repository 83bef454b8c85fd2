"""`secondstage keys create | list | revoke` against a real redis-server."""

from __future__ import annotations

import pytest
import redis
from typer.testing import CliRunner

from core.keys import Keys
from core.redis_server import PrivateRedis
from serve.auth.cli import keys_app
from serve.caller import key_id_of, secret_hash


def test_create_list_revoke(redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECONDSTAGE_REDIS_URL", redis_server.url)
    runner = CliRunner()
    made = runner.invoke(keys_app, ["create", "--name", "app", "--scopes", "chat,feedback", "--rpm", "60"])
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    assert secret.startswith("sk-ss-") and len(secret) > 40
    key_id = key_id_of(secret)
    assert key_id in made.output

    stored = redis.Redis.from_url(redis_server.url).hgetall(Keys().api_keys)
    assert list(stored) == [key_id.encode()]
    raw = stored[key_id.encode()].decode()
    assert secret not in raw and secret_hash(secret) in raw  # only the hash is stored

    listed = runner.invoke(keys_app, ["list"])
    assert listed.exit_code == 0 and key_id in listed.output and "app" in listed.output
    assert "chat,feedback" in listed.output and "rpm=60" in listed.output and "active" in listed.output
    assert secret not in listed.output

    revoked = runner.invoke(keys_app, ["revoke", key_id])
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in runner.invoke(keys_app, ["list"]).output

    unknown = runner.invoke(keys_app, ["revoke", "0000000000000000"])
    assert unknown.exit_code == 2 and "keys list" in unknown.output
    bad = runner.invoke(keys_app, ["create", "--name", "x", "--scopes", "chat,root"])
    assert bad.exit_code == 2 and "scopes" in bad.output and "root" in bad.output
