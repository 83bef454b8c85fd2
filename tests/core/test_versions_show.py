"""`secondstage versions show V`: lineage to base, datasets, metrics and the gate report, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from core.cli import app as cli
from core.keys import Keys
from core.records import Manifest
from core.redis_server import PrivateRedis
from core.versions import Registry

GATE = {
    "passed": True,
    "failed": [],
    "heldout_feedback_ids": ["fb-9"],
    "checks": {
        "regression": {"passed": True, "value": 0, "threshold": 0, "bound": "max", "note": "0 of 19 checks"},
        "anchor_drift": {"passed": True, "value": 0.12, "threshold": 0.5, "bound": "max"},
        "heldout_margin": {"passed": True, "value": None, "note": "only 1 held-out rows"},
    },
}


@pytest.fixture
def registry(tmp_path: Path, redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch) -> Registry:
    for name, value in (("REDIS_URL", redis_server.url), ("VAR_DIR", str(tmp_path / "var")), ("REDIS_PREFIX", "vs")):
        monkeypatch.setenv(f"SECONDSTAGE_{name}", value)
    reg = Registry(redis.Redis.from_url(redis_server.url), Keys("vs"))
    reg.register(Manifest(version="v1", base_model="demo", feedback_ids=["fb-1"], datasets={"dpo": 1}))
    reg.register(
        Manifest(
            version="v2",
            parent="v1",
            base_model="demo",
            feedback_ids=["fb-2", "fb-3"],
            datasets={"dpo": 2, "kto": 0},
            metrics={"dpo_final_loss": 0.25},
            gate=GATE,
        )
    )
    reg.activate("v2")
    return reg


def test_show_prints_lineage_and_the_gate_report(registry: Registry) -> None:
    result = CliRunner().invoke(cli, ["versions", "show", "v2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "v2 (active)" in out and "v2 → v1 → base" in out
    assert "2 trained, 1 held out" in out and "dpo=2" in out and "dpo_final_loss=0.25" in out
    assert "gate: passed" in out
    assert "anchor_drift" in out and "≤ 0.5" in out and "only 1 held-out rows" in out


def test_show_json_is_the_manifest_with_lineage(registry: Registry) -> None:
    result = CliRunner().invoke(cli, ["versions", "show", "v2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["lineage"] == ["v2", "v1", "base"] and out["active"] is True
    assert out["gate"]["checks"]["regression"]["value"] == 0 and out["feedback_ids"] == ["fb-2", "fb-3"]


def test_show_refuses_an_unknown_or_malformed_name(registry: Registry) -> None:
    unknown = CliRunner().invoke(cli, ["versions", "show", "v7"])
    assert unknown.exit_code == 2 and "unknown version 'v7'" in unknown.output and "v1, v2" in unknown.output
    assert CliRunner().invoke(cli, ["versions", "show", "../etc"]).exit_code == 2
