"""The canary rule, sticky routing and the atomic transitions (core/canary.py) on a real redis-server."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import redis

from core.canary import (
    CanaryError,
    Criteria,
    Rollout,
    Signals,
    assign,
    evaluate,
    fisher_greater,
    routing_identity,
    welch_less,
)
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.versions import BASE, Manifest, Registry

CRITERIA = Criteria(min_requests=100, min_duration_s=60, alpha=0.05, max_ttft_ratio=1.5, min_ratings=10)


def healthy(requests: int = 400, **kw: float) -> Signals:
    """A version with ordinary figures: 1% errors, 2% violations, 5% negative and 20% positive feedback."""
    base = {
        "requests": requests,
        "errors": requests // 100,
        "violations": requests // 50,
        "negative": requests // 20,
        "thumbs_up": requests // 5,
        "ttft_sum": 0.1 * requests,
        "ttft_count": requests,
    }
    base.update(kw)
    return Signals(**base)  # type: ignore[arg-type]


# -- the rule ----------------------------------------------------------------------------------------------


def test_fisher_matches_the_tea_tasting_table() -> None:
    # Fisher's lady tasting tea: 3 of 4 cups right; the one-sided p-value is 17/70.
    assert fisher_greater(3, 4, 1, 4) == pytest.approx(17 / 70)
    assert fisher_greater(0, 10, 5, 10) == pytest.approx(1.0)
    assert fisher_greater(0, 10, 0, 10) == 1.0


def test_not_enough_data_waits_whatever_the_figures() -> None:
    awful = healthy(requests=99, errors=99)
    # (The early rollback, off here, acts on figures this bad: its own test is below.)
    verdict = evaluate(awful, healthy(), elapsed_s=600, criteria=dataclasses.replace(CRITERIA, early_alpha=0.0))
    assert verdict.decision == "wait" and "canary 99 of 100 requests" in verdict.reason
    verdict = evaluate(healthy(), healthy(), elapsed_s=59, criteria=CRITERIA)
    assert verdict.decision == "wait" and "59s of 60s" in verdict.reason
    verdict = evaluate(healthy(), healthy(requests=50), elapsed_s=600, criteria=CRITERIA)
    assert verdict.decision == "wait" and "incumbent 50 of 100" in verdict.reason


def test_a_canary_as_good_as_the_incumbent_is_promoted() -> None:
    verdict = evaluate(healthy(requests=200), healthy(requests=800), elapsed_s=600, criteria=CRITERIA)
    assert verdict.decision == "promote", verdict.reason
    assert not any(c["worse"] for c in verdict.checks.values())


def test_a_small_difference_is_noise_not_a_rollback() -> None:
    # 7% negative against 5%, on 200 requests: not significant at 5% after Bonferroni.
    verdict = evaluate(healthy(requests=200, negative=14), healthy(requests=800), elapsed_s=600, criteria=CRITERIA)
    assert verdict.decision == "promote", verdict.reason


@pytest.mark.parametrize(
    ("signal", "canary", "why"),
    [
        ("negative_feedback_rate", {"negative": 60}, "negative_feedback_rate"),
        ("error_rate", {"errors": 12}, "error_rate"),
        ("violation_rate", {"violations": 20}, "violation_rate"),
        ("thumbs_up_rate", {"thumbs_up": 10}, "thumbs_up_rate"),
        ("ttft", {"ttft_sum": 200 * 0.2}, "mean TTFT"),
    ],
)
def test_a_worse_canary_is_rolled_back(signal: str, canary: dict[str, float], why: str) -> None:
    verdict = evaluate(healthy(requests=200, **canary), healthy(requests=800), elapsed_s=600, criteria=CRITERIA)
    assert verdict.decision == "rollback", verdict.reason
    assert why in verdict.reason and verdict.checks[signal]["worse"]
    others = [name for name, check in verdict.checks.items() if check["worse"]]
    assert others == [signal]


def test_ratings_are_compared_once_both_have_enough() -> None:
    def rated(n: int, values: list[int]) -> Signals:
        return healthy(ratings=n, rating_sum=sum(values), rating_sumsq=sum(v * v for v in values))

    low, high = [2, 3] * 10, [4, 5] * 10
    verdict = evaluate(rated(20, low), rated(20, high), elapsed_s=600, criteria=CRITERIA)
    assert verdict.decision == "rollback" and verdict.checks["mean_rating"]["worse"]
    assert welch_less(rated(20, high), rated(20, low)) > 0.99
    few = evaluate(rated(8, low[:8]), rated(20, high), elapsed_s=600, criteria=CRITERIA)
    assert "mean_rating" not in few.checks and few.decision == "promote"


# -- routing -----------------------------------------------------------------------------------------------


def test_routing_is_sticky_and_respects_the_share() -> None:
    ids = [routing_identity(f"key{i % 7}", f"user-{i}") for i in range(20_000)]
    chosen = [assign("v2.abcd", 0.2, ident) for ident in ids]
    assert abs(sum(chosen) / len(ids) - 0.2) < 0.015
    assert chosen == [assign("v2.abcd", 0.2, ident) for ident in ids]  # same identity, same version
    other_run = [assign("v2.ef01", 0.2, ident) for ident in ids]
    assert other_run != chosen  # another canary meets another cohort
    assert routing_identity("k", None) != routing_identity(None, "k")


# -- transitions on Redis ----------------------------------------------------------------------------------


@pytest.fixture
def rollout(redis_server: PrivateRedis) -> Rollout:
    client = redis.Redis.from_url(redis_server.url)
    keys = Keys("t")
    registry = Registry(client, keys)
    for name in ("v1", "v2", "v3"):
        registry.register(Manifest(version=name, base_model="demo"))
    return Rollout(client, keys)


def decisions(rollout: Rollout) -> list[dict[str, object]]:
    entries = rollout.client.xrange(rollout.keys.version_events)
    return [json.loads(f[b"data"]) for _, f in entries]  # type: ignore[union-attr]


def test_start_promote_and_rollback_record_every_step(rollout: Rollout) -> None:
    registry = Registry(rollout.client, rollout.keys)
    pubsub = rollout.client.pubsub()
    pubsub.subscribe(rollout.keys.events)
    pubsub.get_message(timeout=1)
    started = rollout.start("v1", 0.3, trigger="align", reason="gate passed")
    state = rollout.state()
    assert state is not None and state.version == "v1" and state.incumbent == BASE and state.share == 0.3
    assert started["run"] == state.run and registry.active() == BASE  # the canary is not promoted yet
    message = pubsub.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["type"] == "canary_started"

    rollout.client.hincrby(rollout.keys.canary_signals(state.run), "canary.requests", 3)  # as serve records
    assert Rollout.signals(rollout, state.run)["canary"].requests == 3
    with pytest.raises(CanaryError, match="running canary is v1, not v2"):
        rollout.promote("v2")
    promoted = rollout.promote("v1", reason="looks good")
    assert promoted["type"] == "promoted" and registry.active() == "v1" and rollout.state() is None
    assert rollout.client.ttl(rollout.keys.canary_signals(state.run)) > 0  # kept for a while, then gone

    rollout.start("v2", 0.2)
    rolled = rollout.rollback(reason="users complain")
    assert rolled["type"] == "rolled_back" and rolled["incumbent"] == "v1" and registry.active() == "v1"
    with pytest.raises(CanaryError, match="no canary is running"):
        rollout.rollback()

    assert [e["type"] for e in decisions(rollout)] == ["canary_started", "promoted", "canary_started", "rolled_back"]
    assert [e["type"] for e in rollout.history("v2")] == ["canary_started", "rolled_back"]
    assert rollout.history("v2")[-1]["reason"] == "users complain"
    counts = rollout.client.hgetall(rollout.keys.canary_decisions)
    assert counts == {b"promote.operator": b"1", b"rollback.operator": b"1"}


def test_refusals_change_nothing(rollout: Rollout) -> None:
    with pytest.raises(CanaryError, match="not in the registry"):
        rollout.start("v9", 0.2)
    with pytest.raises(CanaryError, match="already the promoted version"):
        rollout.start(BASE, 0.2)
    with pytest.raises(CanaryError, match="between 0 and 1"):
        rollout.start("v1", 1.0)
    assert rollout.state() is None and decisions(rollout) == []


def test_a_new_canary_or_an_activation_supersedes_the_running_one(rollout: Rollout) -> None:
    registry = Registry(rollout.client, rollout.keys)
    first = rollout.start("v1", 0.2)
    rollout.start("v2", 0.2, trigger="align")
    state = rollout.state()
    assert state is not None and state.version == "v2"
    assert [e["type"] for e in rollout.history("v1")] == ["canary_started", "superseded"]
    assert rollout.history("v1")[-1]["run"] == first["run"]
    registry.activate("v3")
    assert rollout.state() is None and registry.active() == "v3"
    assert [e["type"] for e in rollout.history("v2")] == ["canary_started", "superseded"]
    assert rollout.history("v3")[-1]["type"] == "activated"


def test_exactly_one_of_many_concurrent_decisions_wins(rollout: Rollout, redis_server: PrivateRedis) -> None:
    """Replicas judging the same run at once: one decision is applied, the rest find the run over."""
    run = rollout.start("v1", 0.5)["run"]
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def judge(i: int) -> None:
        mine = Rollout(redis.Redis.from_url(redis_server.url), rollout.keys)
        barrier.wait()
        op = "promote" if i % 2 else "rollback"
        results.append(mine._run(op, run=run, trigger="auto").applied)

    threads = [threading.Thread(target=judge, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]
    ends = [e for e in decisions(rollout) if e["type"] in ("promoted", "rolled_back")]
    assert len(ends) == 1
    counts = rollout.client.hgetall(rollout.keys.canary_decisions)
    assert sum(int(v) for v in counts.values()) == 1  # type: ignore[union-attr]
    # A judge that read an older run cannot end the next canary either.
    rollout.start("v2", 0.5)
    assert not rollout._run("rollback", run=run, trigger="auto").applied
    assert rollout.state() is not None


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_starts_promotes_and_rolls_back(
    rollout: Rollout,
    redis_server: PrivateRedis,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from typer.testing import CliRunner

    from core.cli import app as cli

    for name, value in (("REDIS_URL", redis_server.url), ("VAR_DIR", str(tmp_path / "var")), ("REDIS_PREFIX", "t")):
        monkeypatch.setenv(f"SECONDSTAGE_{name}", value)
    runner = CliRunner()
    started = runner.invoke(cli, ["versions", "canary", "v1", "--share", "0.25"])
    assert started.exit_code == 0, started.output
    assert rollout.state().share == 0.25  # type: ignore[union-attr]
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table to the terminal otherwise
    listing = runner.invoke(cli, ["versions", "list"])
    assert "* incumbent" in listing.output and "canary 25%" in listing.output

    refused = runner.invoke(cli, ["versions", "promote", "v2"])
    assert refused.exit_code == 2 and "running canary is v1, not v2" in refused.output
    promoted = runner.invoke(cli, ["versions", "promote", "v1", "--reason", "checked the samples"])
    assert promoted.exit_code == 0, promoted.output
    assert Registry(rollout.client, rollout.keys).active() == "v1"
    assert rollout.history("v1")[-1] == {**rollout.history("v1")[-1], "type": "promoted", "trigger": "operator",
                                         "reason": "checked the samples"}  # fmt: skip

    assert runner.invoke(cli, ["versions", "canary", "v2"]).exit_code == 0
    assert rollout.state().share == 0.2  # type: ignore[union-attr]  # SECONDSTAGE_CANARY_SHARE's default
    rolled = runner.invoke(cli, ["versions", "rollback"])
    assert rolled.exit_code == 0 and "v1 serves everyone" in rolled.output
    again = runner.invoke(cli, ["versions", "rollback"])
    assert again.exit_code == 2 and "no canary is running" in again.output


def test_a_clearly_broken_canary_is_rolled_back_before_the_minimums() -> None:
    # Half its requests fail, none of the incumbent's: p ≈ 4e-5 on 30 requests each, far below 0.001.
    broken = evaluate(healthy(requests=30, errors=15), healthy(requests=30), elapsed_s=5, criteria=CRITERIA)
    assert broken.decision == "rollback", broken.reason
    assert "before the minimums" in broken.reason and broken.checks["error_rate"]["worse"]
    # The same evidence at the ordinary level is not enough early: 3 failures in 30 against none waits.
    unclear = evaluate(healthy(requests=30, errors=3), healthy(requests=30), elapsed_s=5, criteria=CRITERIA)
    assert unclear.decision == "wait", unclear.reason
    # Too few requests to judge at all, however bad; and it can be turned off.
    few = evaluate(healthy(requests=10, errors=10), healthy(requests=10), elapsed_s=5, criteria=CRITERIA)
    assert few.decision == "wait"
    off = dataclasses.replace(CRITERIA, early_alpha=0.0)
    assert evaluate(healthy(requests=30, errors=15), healthy(requests=30), elapsed_s=5, criteria=off).decision == "wait"
    # Nothing is promoted early, however good it looks.
    assert evaluate(healthy(requests=30), healthy(requests=30, errors=15), 5, CRITERIA).decision == "wait"
