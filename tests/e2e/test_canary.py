"""Canaries on real parts: two `secondstage serve` replicas (real vLLM on the demo model) on one real Redis,
simulated users over the official openai client, decisions made by the replicas themselves.

Two versions are written as an operator's tooling would (a PEFT LoRA adapter on the demo model, saved with
`VersionStore` and registered), faster than training them: v1's LoRA B matrices are random, so its answers
are garbage; v2's are zero, so it answers as the base model does. Each is started as a canary for half the
callers with `secondstage versions canary`. Simulated users ask the demo model's questions, each as one
identity (the `user` field), streamed or not, on either replica; they like an answer that says what the
base model says (thumbs up, rating 5) and dislike any other (thumbs down, rating 1, the base answer as the
correction), posting feedback to the replica that answered.

- v1 (disliked) is rolled back automatically; afterwards everyone gets the incumbent (base).
- v2 (liked) is promoted automatically; afterwards everyone gets v2.
- During both, every request succeeds; every chunk of a stream names one version; each caller gets its
  sticky assignment (`core.canary.assign`) on both replicas until the decision, then the outcome, never
  going back; exactly one decision is written per canary although both replicas judge it.

Settings are small so it runs in minutes: 12 requests per side, 5 s, a judge every second. The TTFT bound is
loose (20x) because on this shared CPU a LoRA request and a base one differ in latency by load, not by version;
the TTFT rule itself is tested in tests/core/test_canary.py.
"""

from __future__ import annotations

import difflib
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from bench.harness import ROOT, ServerProcess, ensure_demo_model, running, secondstage_server, short_tmpdir
from core.canary import Rollout, assign, routing_identity
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.versions import BASE, Manifest, Registry, VersionStore

pytestmark = pytest.mark.slow

PROMPTS = [
    "What colour is the sky?",
    "What is the capital of France?",
    "What sound does a cow make?",
    "What is 3 plus 4?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
]
USERS = [f"user-{i}" for i in range(24)]
SHARE = 0.5
MIN_REQUESTS = 12


@dataclass
class Fleet:
    redis: PrivateRedis
    servers: list[ServerProcess]
    var: Path
    model: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *args],
            env=self.servers[0].env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    model = ensure_demo_model()
    base = short_tmpdir("canary-")
    tmp = tmp_path_factory.mktemp("canary")
    redis_server = PrivateRedis(base / "redis")
    redis_server.start()
    var = tmp / "var"
    servers = [
        secondstage_server(
            redis_url=redis_server.url,
            var_dir=var,
            log=tmp / f"{name}.log",
            model=model,
            engine=None,
            log_level="info",
            extra_env={
                "SECONDSTAGE_REPLICA_NAME": name,
                "SECONDSTAGE_RECONCILE_INTERVAL_S": "1",
                "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": "0.05",
                "SECONDSTAGE_CANARY_MIN_REQUESTS": str(MIN_REQUESTS),
                "SECONDSTAGE_CANARY_MIN_DURATION_S": "5",
                "SECONDSTAGE_CANARY_EVAL_INTERVAL_S": "1",
                "SECONDSTAGE_CANARY_MIN_RATINGS": "5",
                "SECONDSTAGE_CANARY_MAX_TTFT_RATIO": "20",
            },
        )
        for name in ("serve-0", "serve-1")
    ]
    try:
        with running(servers[0]), running(servers[1]):
            yield Fleet(redis_server, servers, var, model)
    finally:
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _write_version(fleet: Fleet, name: str, *, garbage: bool, work: Path) -> None:
    """A LoRA adapter on the demo model: random B (garbage answers) or zero B (the base model's answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.train import LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(fleet.model), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    if garbage:
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.5)
    adapter = work / f"adapter-{name}"
    peft_model.save_pretrained(str(adapter))
    store = VersionStore(fleet.var / "models" / "versions")
    store.write(Manifest(version=name, base_model=str(fleet.model), lora_rank=8), adapter)
    Registry(redis.Redis.from_url(fleet.redis.url), Keys()).register(store.manifest(name))


@dataclass
class Answer:
    user: str
    replica: int
    fingerprints: set[str]
    text: str
    prompt: str
    finished: str | None


def _ask(server: ServerProcess, user: str, prompt: str, stream: bool) -> tuple[str, Answer]:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="anonymous", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": prompt}]
    replica = -1  # filled by the caller
    if not stream:
        r = client.chat.completions.create(
            model="demo",
            messages=messages,
            user=user,
            temperature=0,
            max_tokens=16,  # type: ignore[arg-type]
        )
        text = r.choices[0].message.content or ""
        return r.id, Answer(user, replica, {r.system_fingerprint or ""}, text, prompt, r.choices[0].finish_reason)
    parts, fingerprints, finished, cid = [], set(), None, ""
    for chunk in client.chat.completions.create(
        model="demo",
        messages=messages,
        user=user,
        temperature=0,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    ):
        cid = chunk.id
        fingerprints.add(chunk.system_fingerprint or "")
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finished = choice.finish_reason or finished
    return cid, Answer(user, replica, fingerprints, "".join(parts), prompt, finished)


def _liked(answer: Answer, reference: dict[str, str]) -> bool:
    return difflib.SequenceMatcher(None, answer.text, reference[answer.prompt]).ratio() >= 0.9


def _metric(server: ServerProcess, line_start: str) -> str | None:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return line.rsplit(" ", 1)[1]
    return None


def _wait(what: str, check, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _phase(fleet: Fleet, version: str, reference: dict[str, str], expect: str) -> dict[str, object]:
    """Run one canary of `version` under simulated users until serve decides; check what every caller saw."""
    rollout = Rollout(redis.Redis.from_url(fleet.redis.url), Keys())
    incumbent = Registry(rollout.client, rollout.keys).active()
    started = fleet.cli("versions", "canary", version, "--share", str(SHARE))
    assert started.returncode == 0, started.stdout + started.stderr
    state = rollout.state()
    assert state is not None and state.version == version
    sticky = {u: version if assign(state.run, SHARE, routing_identity(None, u)) else incumbent for u in USERS}
    assert 4 <= sum(v == version for v in sticky.values()) <= len(USERS) - 4, sticky
    for server in fleet.servers:  # both replicas route to it before the traffic starts
        _wait(
            f"{server.url} to load canary {version}", lambda s=server: _metric(s, "secondstage_canary_share") == "0.5"
        )

    answers: list[Answer] = []
    lock = threading.Lock()
    counter = itertools.count()

    def one(user: str) -> None:
        i = next(counter)
        replica = i % 2
        server = fleet.servers[replica]
        cid, answer = _ask(server, user, PROMPTS[i % len(PROMPTS)], stream=bool(i // 2 % 2))
        answer.replica = replica
        liked = _liked(answer, reference)
        feedback = (
            {"thumbs": "up", "rating": 5}
            if liked
            else {"thumbs": "down", "rating": 1, "correction": reference[answer.prompt]}
        )
        r = httpx.post(server.url + "/v1/feedback", json={"completion_id": cid, **feedback}, timeout=30)
        assert r.status_code == 200, r.text
        with lock:
            answers.append(answer)

    # Simulated users until serve decides, then one more round each, on both replicas, after both followed.
    deadline = time.monotonic() + 600
    with ThreadPoolExecutor(4) as pool:
        while rollout.state() is not None:
            assert time.monotonic() < deadline, "no decision within 10 minutes"
            list(pool.map(one, USERS))
        for server in fleet.servers:
            _wait(
                f"{server.url} to follow the decision", lambda s=server: _metric(s, "secondstage_canary_share") == "0.0"
            )
        decided_at = len(answers)
        list(pool.map(one, USERS * 2))

    # Every request succeeded, every stream named one version, and each caller got its sticky version until
    # the decision, then the outcome for good (per replica: each follows the decision on its own).
    assert all(a.finished in ("stop", "length") for a in answers), [
        a for a in answers if a.finished not in ("stop", "length")
    ]
    assert all(len(a.fingerprints) == 1 for a in answers), [a.fingerprints for a in answers if len(a.fingerprints) > 1]
    seen: dict[tuple[str, int], list[str]] = defaultdict(list)
    for a in answers[:decided_at]:
        seen[(a.user, a.replica)].append(next(iter(a.fingerprints)))
    for (user, replica), fingerprints in seen.items():
        switched = next((i for i, f in enumerate(fingerprints) if f != sticky[user]), len(fingerprints))
        assert set(fingerprints[switched:]) <= {expect}, (user, replica, sticky[user], fingerprints)
    after = [next(iter(a.fingerprints)) for a in answers[decided_at:]]
    assert set(after) == {expect}, after
    on_canary = [a for a in answers[:decided_at] if a.fingerprints == {version}]
    assert len(on_canary) >= MIN_REQUESTS

    # One decision, by a replica, recorded in the stream, the version's log and both replicas' metrics.
    ends = [
        json.loads(f[b"data"])
        for _, f in rollout.client.xrange(rollout.keys.version_events)
        if json.loads(f[b"data"]).get("run") == state.run and f[b"type"] != b"canary_started"
    ]
    assert len(ends) == 1, ends
    decision = ends[0]
    assert decision["trigger"] == "auto" and rollout.history(version)[-1] == decision
    assert Registry(rollout.client, rollout.keys).active() == expect
    return {"decision": decision, "answers": answers[:decided_at], "sticky": sticky}


def test_disliked_canary_rolls_back_and_liked_one_is_promoted(fleet: Fleet, tmp_path: Path) -> None:
    _write_version(fleet, "v1", garbage=True, work=tmp_path)
    _write_version(fleet, "v2", garbage=False, work=tmp_path)
    a, b = fleet.servers
    reference = {}
    for prompt in PROMPTS:
        _, answer = _ask(a, "reference", prompt, stream=False)
        assert answer.fingerprints == {BASE}
        reference[prompt] = answer.text

    # v1: its users dislike what it says; the replicas roll it back.
    first = _phase(fleet, "v1", reference, expect=BASE)
    decision = first["decision"]
    assert decision["type"] == "rolled_back" and "negative_feedback_rate" in decision["reason"], decision  # type: ignore[index]
    disliked = [x for x in first["answers"] if x.fingerprints == {"v1"}]  # type: ignore[attr-defined]
    assert sum(not _liked(x, reference) for x in disliked) >= len(disliked) * 0.8  # it really answers worse
    for server in (a, b):
        assert _metric(server, 'secondstage_canary_decisions_total{decision="rollback",trigger="auto"}') == "1.0"

    # v2: its users like it as much as the base model's answers; the replicas promote it.
    second = _phase(fleet, "v2", reference, expect="v2")
    assert second["decision"]["type"] == "promoted", second["decision"]  # type: ignore[index]
    for server in (a, b):
        assert _metric(server, 'secondstage_canary_decisions_total{decision="promote",trigger="auto"}') == "1.0"
        card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        assert card["version"] == card["wanted_version"] == "v2"
    listing = fleet.cli("versions", "list")
    assert listing.returncode == 0 and "v2" in listing.stdout
