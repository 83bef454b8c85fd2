"""`secondstage align run` and `secondstage feedback export` through typer, on a real redis-server."""

from __future__ import annotations

import json

import pytest
import redis
from typer.testing import CliRunner

from align.cli import align_app, feedback_app, parse_duration
from align.settings import AlignSettings
from core.keys import Keys

from .conftest import Server


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("90", 90), ("1.5m", 90)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "10 minutes", "0s", "5m-3s"])
def test_parse_duration_rejects_with_the_input_named(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.fixture
def env(settings: AlignSettings, monkeypatch: pytest.MonkeyPatch) -> AlignSettings:
    monkeypatch.setenv("SECONDSTAGE_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("SECONDSTAGE_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("SECONDSTAGE_MODEL", settings.model_path)
    monkeypatch.setenv("SECONDSTAGE_HELDOUT_SHARE", "0")  # as in `settings`: random ids, no random split
    return settings


def test_run_with_too_little_feedback_exits_zero(env: AlignSettings, server: Server, client: redis.Redis) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    result = CliRunner().invoke(align_app, ["run"])
    assert result.exit_code == 0, result.output
    assert "not enough feedback" in result.output
    assert client.get(Keys(env.redis_prefix).active_version) is None


def test_run_min_feedback_flag_overrides_settings(env: AlignSettings, server: Server) -> None:
    server.feedback(server.completion("Q?", "A."), thumbs="up")
    server.feedback(server.completion("Q2?", "B."), thumbs="down")
    result = CliRunner().invoke(align_app, ["run", "--dry-run", "--min-feedback", "2"])
    assert result.exit_code == 0, result.output
    assert "dry run: would train on 2 rows" in result.output


def test_run_rejects_a_bad_interval(env: AlignSettings) -> None:
    result = CliRunner().invoke(align_app, ["run", "--every", "soon"])
    assert result.exit_code == 2
    assert "--every" in result.output and "soon" in result.output


def test_export_writes_trl_jsonl_without_consuming(env: AlignSettings, server: Server, client: redis.Redis) -> None:
    keys = Keys(env.redis_prefix)
    cid = server.completion("What colour is the sky?", "Green.")
    server.feedback(cid, thumbs="down", correction="Blue.")
    out = env.var_dir / "export"
    result = CliRunner().invoke(feedback_app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    dpo = [json.loads(line) for line in (out / "dpo.jsonl").read_text().splitlines()]
    kto = [json.loads(line) for line in (out / "kto.jsonl").read_text().splitlines()]
    assert dpo == [
        {
            "prompt": [{"role": "user", "content": "What colour is the sky?"}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    ]
    assert kto == []  # a thumbs-down with a correction trains only as the pair (align/datasets.py)
    # Export only looks: the feedback is still there for `align run`.
    assert not client.exists(keys.policy_pairs)
    assert client.xinfo_stream(keys.feedback)["groups"] == 0


def test_run_with_the_lock_held_exits_75(env: AlignSettings, server: Server, client: redis.Redis) -> None:
    from align.job import align_lock

    other = align_lock(client, Keys(env.redis_prefix).align_lock, 60)
    assert other.acquire()
    result = CliRunner().invoke(align_app, ["run"])
    assert result.exit_code == 75, result.output
    assert "holds the lock" in result.output


def test_refusals_exit_apart_from_failures_and_the_help_says_so() -> None:
    from align.job import EXIT_CODES

    # 1 is a failed run and 2 a usage error: a scheduler retries those, not a refused gate or a held lock.
    assert EXIT_CODES["gate_failed"] == 3 and EXIT_CODES["locked"] == 75
    result = CliRunner().invoke(align_app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "3 the gate refused the adapter" in text and "75 another run holds the lock" in text


def json_runs(stdout: str) -> list[dict[str, object]]:
    """`align run --json` stdout: every line is one JSON object, and nothing else is there."""
    return [json.loads(line) for line in stdout.splitlines()]


def test_run_json_prints_one_object_and_only_that_on_stdout(env: AlignSettings, server: Server) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    result = CliRunner().invoke(align_app, ["run", "--json"])
    assert result.exit_code == 0, result.output
    [run] = json_runs(result.stdout)
    assert run["outcome"] == "insufficient" and run["exit_code"] == 0
    assert run["rows"] == {"dpo": 0, "kto": 1, "kto_desirable": 1}
    assert isinstance(run["duration_s"], float)
    assert run["gate"] == {"passed": None, "failed": [], "checks": {}}
    assert "not enough feedback" in result.stderr  # the logs went to stderr


def test_run_json_reports_a_refused_gate_check_by_check(
    env: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path
    from types import SimpleNamespace

    import align.job

    from .test_job import seed_corrections
    from .test_metrics import GATE

    seed_corrections(server)
    monkeypatch.setattr(
        align.job,
        "_train",
        lambda *a, **k: SimpleNamespace(metrics={"dpo_final_loss": float("nan")}, adapter_dir=Path()),
    )
    monkeypatch.setattr(align.job, "evaluate_gate", lambda *a, **k: GATE)
    result = CliRunner().invoke(align_app, ["run", "--json"])
    assert result.exit_code == 3, result.output
    [run] = json_runs(result.stdout)
    assert run["outcome"] == "gate_failed" and run["exit_code"] == 3 and run["version"] is None
    assert run["gate"] == {
        "passed": False,
        "failed": ["margin_gain"],
        "checks": {
            "metrics_finite": {"value": "all finite", "passed": True},
            "weights_finite": {"value": True, "passed": True},
            "weights_changed": {"value": 0.25, "threshold": 0.0, "passed": True},
            "margin_gain": {"value": -0.5, "threshold": 0.0, "passed": False},
        },
    }
    assert run["training"] == {"dpo_final_loss": "nan"}  # strict JSON: no NaN literal


def test_run_json_reports_a_failed_run(env: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.job

    from .test_job import seed_corrections

    seed_corrections(server)

    def broken(*args: object, **kwargs: object) -> None:
        raise align.job.AlignError("disk full")

    monkeypatch.setattr(align.job, "_train", broken)
    result = CliRunner().invoke(align_app, ["run", "--json"])
    assert result.exit_code == 1, result.output
    [run] = json_runs(result.stdout)
    assert run["outcome"] == "failed" and run["exit_code"] == 1 and "disk full" in str(run["message"])


def test_run_every_json_prints_one_object_per_run(env: AlignSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.job

    real = align.job.run_every
    monkeypatch.setattr(align.job, "run_every", lambda *a, **k: real(*a, **{**k, "max_runs": 2}))
    result = CliRunner().invoke(align_app, ["run", "--every", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["outcome"] for r in json_runs(result.stdout)] == ["insufficient", "insufficient"]


def test_export_without_redis_is_one_line_and_exit_1(env: AlignSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.harness import free_port

    monkeypatch.setenv("SECONDSTAGE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    result = CliRunner().invoke(feedback_app, ["export", "--out", str(env.var_dir / "export")])
    assert result.exit_code == 1, result.output
    assert "feedback export failed: cannot reach Redis" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert "Traceback" not in result.output
