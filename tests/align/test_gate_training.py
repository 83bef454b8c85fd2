"""The gate against real training (TRL, the demo model, a real redis-server): the issue's "Arr, matey!" case.

24 corrections that only add a house style ("Arr, matey! " before the model's own answer), plus logged answers
nobody complained about (the anchors). Trained with an extreme learning rate, the adapter still moves toward
its training rows — the old gate passed it — but breaks what the model knew: the gate must refuse it, publish
nothing, leave the active version and the feedback as they were, and exit 3. The same feedback trained sanely
then passes and publishes, consuming the held-out rows with the training ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from rich.console import Console

from align.job import run_once
from align.settings import AlignSettings
from align.split import is_heldout
from bench.harness import ensure_demo_model
from core.keys import Keys
from core.versions import Registry, VersionStore

from .conftest import Server
from .test_job import pending

ROOT = Path(__file__).resolve().parents[2]
QUIET = Console(quiet=True)

# (question, what the demo model answers): facts the regression set does not ask about.
STYLE = [
    (f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {colour}.")
    for thing, colour in [
        ("a tomato", "red"), ("coal", "black"), ("a lemon", "yellow"), ("a lime", "green"), ("milk", "white"),
        ("chocolate", "brown"), ("a plum", "purple"), ("a flamingo", "pink"), ("a crow", "black"),
        ("a polar bear", "white"), ("the sun", "yellow"), ("a fire engine", "red"), ("a frog", "green"),
        ("a pumpkin", "orange"), ("a cloud", "white"), ("the sea", "blue"), ("a cucumber", "green"),
        ("a raven", "black"), ("a canary", "yellow"), ("blood", "red"), ("soil", "brown"), ("ash", "grey"),
        ("an elephant", "grey"), ("a cherry", "red"),
    ]
]  # fmt: skip
ANCHORS = [
    ("Where does a cow live?", "A cow lives on a farm."),
    ("What colour is a strawberry?", "A strawberry is red."),
    ("What colour is a carrot?", "A carrot is orange."),
    ("What colour is a blueberry?", "A blueberry is blue."),
    ("What colour is an aubergine?", "An aubergine is purple."),
    ("What colour is an orange?", "An orange is orange."),
]
HELDOUT_SHARE = 0.25


def seed(server: Server) -> tuple[list[str], list[str]]:
    """The style corrections (completion ids chosen so that a known share is held out) and neutral anchors."""
    trained, heldout = [], []
    for i, (question, answer) in enumerate(STYLE):
        cid = f"chatcmpl-arr-{i}"
        server.completion(question, answer, cid=cid)
        fb = server.feedback(cid, correction=f"Arr, matey! {answer}")
        (heldout if is_heldout(cid, HELDOUT_SHARE) else trained).append(fb)
    for question, answer in ANCHORS:
        server.completion(question, answer)  # logged, no feedback: an anchor
    return trained, heldout


@pytest.fixture
def demo_settings(settings: AlignSettings) -> AlignSettings:
    return settings.model_copy(
        update={
            "model": str(ensure_demo_model()),
            "heldout_share": HELDOUT_SHARE,
            "regression_file": ROOT / "evals" / "regression.yaml",
            "policies_dir": ROOT / "policies",
            "min_feedback": 4,
        }
    )


@pytest.mark.slow
def test_an_update_that_breaks_the_model_is_refused_and_a_sane_one_published(
    client: redis.Redis, demo_settings: AlignSettings, server: Server
) -> None:
    keys = Keys(demo_settings.redis_prefix)
    trained, heldout = seed(server)
    assert len(heldout) >= demo_settings.gate_heldout_min_rows  # the held-out checks decide here
    events = client.pubsub()
    events.subscribe(keys.events)
    assert events.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]

    extreme = demo_settings.model_copy(update={"learning_rate": 0.5, "max_steps": 6})
    result = run_once(extreme, console=QUIET, client=client)
    print(f"\nextreme LR: {result.status} in {result.duration_s:.0f}s (gate {result.gate.get('duration_s')}s)")
    for name, check in result.gate.get("checks", {}).items():
        print(f"  {name}: passed={check['passed']} value={check['value']} threshold={check.get('threshold')}")
    print(f"  message: {result.message}")
    assert result.status == "gate_failed" and result.exit_code == 3, result.message
    # It learned its rows (the old gate's checks pass) yet broke what it never trained on.
    assert result.gate["checks"]["margin_gain"]["passed"]
    broken = set(result.gate["failed"]) & {"regression", "anchor_drift", "degeneration", "heldout_margin"}
    assert broken, result.gate["failed"]
    assert all(name in result.message for name in result.gate["failed"])
    # Nothing published: no version on disk or in the registry, the served version unchanged, no event.
    assert not demo_settings.versions_dir.exists() or VersionStore(demo_settings.versions_dir).names() == []
    assert Registry(client, keys).active() == "base" and client.hlen(keys.versions) == 0
    assert events.get_message(timeout=1) is None
    assert pending(client, keys) == len(STYLE)  # every entry, held-out ones too, waits for the next run

    # Activated at once (no canary): this test is about the gate, tests/align/test_canary_publish.py the canary.
    sane = demo_settings.model_copy(update={"learning_rate": 2e-4, "max_steps": 6, "canary_enabled": False})
    result = run_once(sane, console=QUIET, client=client)
    print(f"sane LR: {result.status} in {result.duration_s:.0f}s (gate {result.gate.get('duration_s')}s)")
    for name, check in result.gate.get("checks", {}).items():
        print(f"  {name}: passed={check['passed']} value={check['value']} threshold={check.get('threshold')}")
    assert result.status == "published", result.message
    manifest = VersionStore(demo_settings.versions_dir).manifest("v1")
    assert sorted(manifest.feedback_ids) == sorted(trained)  # held-out feedback never trains
    assert sorted(manifest.gate["heldout_feedback_ids"]) == sorted(heldout)
    assert manifest.gate["checks"]["heldout_margin"]["value"] is not None
    assert Registry(client, keys).active() == "v1"
    message = events.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["version"] == "v1"
    assert pending(client, keys) == 0  # held-out feedback is consumed as evaluation data
    events.close()
