"""Policies that stay flat in the number of rules: what the stream filter does per chunk, and reloads off the loop.

bench/policy_bench.py measures the figures; these tests pin the behaviour the figures rest on:
- the tail database reports only the leftmost possible-match start of all rules (one callback per chunk), per
  group when some rules only record (flag, shadow);
- text that merely *could* begin a match of hundreds of rules costs no Python per rule, and record-only rules
  hold nothing back;
- every preset compiles exactly (no fallback search, no prefilter);
- a large rule set reloads without stalling the event loop (the gap is judged against the reload's own length,
  and the same check run on the loop fails, so it can fail).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import hyperscan
import pytest
from prometheus_client import CollectorRegistry

from core.policy import PolicyEngine, compiler, loading
from core.policy.presets import PRESETS
from core.policy.stream import Matcher
from tests.core.policy.conftest import CTX, WORDS, keyword_rules, stream, write_rules


def preset_rules() -> str:
    return "rules:\n" + "".join(
        f"  - {{id: {name}, description: p, kind: preset, preset: {name}, action: redact}}\n"
        for name in sorted(PRESETS)
    )


def prose(n_words: int, seed: int = 2) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def engine_for(directory: Path, body: str) -> PolicyEngine:
    write_rules(directory, body)
    engine = PolicyEngine(directory, registry=CollectorRegistry())
    engine.load()
    return engine


def test_tail_reports_the_leftmost_start_of_all_rules(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, preset_rules() + keyword_rules(60).removeprefix("rules:\n"))
    stage = engine.active.stages["output"]
    assert stage.tail_db is not None
    # The reference: the same prefix patterns with one id per rule, the minimum taken in Python.
    per_rule = compiler._compile(
        hyperscan.HS_MODE_BLOCK,
        [
            (r.index, r.analysed.prefix, compiler._hs_flags(r.analysed, som=True))
            for r in stage.rules
            if r.analysed.prefix is not None and not r.always_hold
        ],
    )
    rng = random.Random(3)
    pieces = [*WORDS, "thewas", "sk-proj-abc", "4111 11", "jane.doe@exa", "-----BEGIN RSA PRIV", "password = ab", " "]
    checked = 0

    def starts(db: hyperscan.Database, data: bytes) -> list[int]:
        found: list[int] = []
        db.scan(data, match_event_handler=lambda _i, start, _t, _f, _c: found.append(start))
        return found

    for _ in range(300):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        one, each = starts(stage.tail_db, text.encode()), starts(per_rule, text.encode())
        assert len(one) <= 1
        assert (one[0] if one else None) == (min(each) if each else None), text
        checked += bool(each)
    assert checked > 100  # most texts end inside a possible match


def test_the_tail_reports_one_leftmost_start_per_group(tmp_path: Path) -> None:
    """Rules that change text and rules that only record get one report each: the leftmost start of their group."""
    body = preset_rules() + keyword_rules(60).removeprefix("rules:\n")
    lines = body.splitlines(keepends=True)
    # Every third rule only records: a flag, or a shadow redact.
    for k in range(1, len(lines), 3):
        lines[k] = lines[k].replace("action: redact}", "action: flag}" if k % 2 else "action: redact, mode: shadow}")
    engine = engine_for(tmp_path, "".join(lines))
    stage = engine.active.stages["output"]
    assert stage.tail_db is not None and 0 < len(stage.record_only) < len(stage.rules)
    groups = {}
    for group, indices in (
        (compiler.TAIL_CHANGES, [r.index for r in stage.rules if r.index not in stage.record_only]),
        (compiler.TAIL_RECORDS, sorted(stage.record_only)),
    ):
        groups[group] = compiler._compile(
            hyperscan.HS_MODE_BLOCK,
            [
                (i, stage.rules[i].analysed.prefix, compiler._hs_flags(stage.rules[i].analysed, som=True))
                for i in indices
                if stage.rules[i].analysed.prefix is not None and not stage.rules[i].always_hold
            ],
        )
    rng = random.Random(4)
    pieces = [*WORDS, "thewas", "sk-proj-abc", "4111 11", "jane.doe@exa", "-----BEGIN RSA PRIV", "password = ab", " "]
    both = 0

    def reported(db: hyperscan.Database, data: bytes) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        db.scan(data, match_event_handler=lambda i, start, _t, _f, _c: found.append((i, start)))
        return found

    for _ in range(300):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        reports = reported(stage.tail_db, text.encode())
        for group, db in groups.items():
            got = [start for i, start in reports if i == group]
            each = [start for _i, start in reported(db, text.encode())]
            assert len(got) <= 1
            assert (got[0] if got else None) == (min(each) if each else None), (group, text)
        both += len(reports) == 2
    assert both > 30  # many texts end inside a possible match of both groups


@pytest.mark.parametrize("action", ["redact", "flag"])
def test_text_that_could_begin_hundreds_of_rules_costs_no_python_per_rule(
    action: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(tmp_path, keyword_rules(300).replace("action: redact", f"action: {action}"))
    text = prose(600)
    calls = 0
    advance = Matcher._advance

    def counting(self: Matcher, *args: object) -> None:
        nonlocal calls
        calls += 1
        advance(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Matcher, "_advance", counting)
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    out, _ = stream(engine, chunks)
    assert out == text
    # Many chunks end in text that could begin a keyword (the hold-back shows it; a rule that only flags holds
    # nothing back) ...
    f = engine.output_filter(CTX)
    held = sum(1 for c in chunks if len(f.feed(c).emit) < len(c))
    if action == "flag":
        assert held == 0
    else:
        assert held > len(chunks) // 10
    # ... and yet no rule was ever looked at in Python: none had a hit.
    assert calls == 0


def test_a_hit_is_still_found_when_hundreds_of_rules_are_pending(tmp_path: Path) -> None:
    body = keyword_rules(300) + "  - {id: mail, description: e, kind: preset, preset: email, action: redact}\n"
    engine = engine_for(tmp_path, body)
    text = prose(80) + " mail the jane.doe@example.com now " + prose(40, seed=5)
    for size in (1, 2, 5):
        out, _ = stream(engine, [text[i : i + size] for i in range(0, len(text), size)])
        assert out == text.replace("jane.doe@example.com", "[EMAIL]")


def test_every_preset_compiles_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*_args: object) -> list[int]:
        raise AssertionError("a preset needed the fallback search (too large for hyperscan)")

    monkeypatch.setattr(compiler, "_failing", no_fallback)
    engine = engine_for(tmp_path, preset_rules())
    stage = engine.active.stages["output"]
    assert len(stage.rules) == len(PRESETS) and not stage.always_hold
    # The wide repeats are cut to their minimum in the trigger the stream database compiles.
    secret = next(r for r in stage.rules if r.rule.id == "generic_secret").analysed
    assert "{12,200}" in secret.hyperscan and "{12,12}" in secret.trigger and "{12,200}" not in secret.trigger


def test_a_pattern_hyperscan_refuses_is_found_among_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = compiler._compile

    def refusing(mode: int, exprs: list[tuple[int, str, int]]) -> hyperscan.Database:
        nonlocal calls
        calls += 1
        if any("zzbad" in e[1] and not e[2] & hyperscan.HS_FLAG_PREFILTER for e in exprs):
            raise hyperscan.error("Pattern is too large.")
        return real(mode, exprs)

    monkeypatch.setattr(compiler, "_compile", refusing)
    body = keyword_rules(200) + "  - {id: bad, description: b, kind: keywords, keywords: [zzbad], action: redact}\n"
    engine = engine_for(tmp_path, body)
    out, _ = stream(engine, list("say zzbad now"))
    assert out == "say [REDACTED] now"
    # Halving finds it in a few dozen compiles, not one per rule.
    assert calls < 40


async def _max_gap_during(work: asyncio.Future[object] | None, run_on_loop: object = None) -> tuple[float, float]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    if work is not None:
        await work
    elif callable(run_on_loop):
        run_on_loop()
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.02)
    stop.set()
    await task
    return elapsed, max(gaps)


def test_a_large_rule_set_reloads_without_stalling_the_loop(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, preset_rules() + keyword_rules(300).removeprefix("rules:\n"))

    async def off_loop() -> tuple[float, float]:
        return await _max_gap_during(asyncio.ensure_future(engine.reload_off_loop(announce=False)))

    async def on_loop() -> tuple[float, float]:
        return await _max_gap_during(None, run_on_loop=engine.reload)

    elapsed, gap = asyncio.run(off_loop())
    # The check can fail: the same reload run on the loop stalls it for (nearly) all of its length.
    on_elapsed, on_gap = asyncio.run(on_loop())
    assert on_gap > on_elapsed / 2
    assert gap < elapsed / 3, f"the loop stalled {gap:.3f}s during a {elapsed:.3f}s reload"


def test_reload_off_loop_compiles_in_a_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The set is compiled by `python -m core.policy.worker`, not in this process; its errors come back located."""
    engine = engine_for(tmp_path, preset_rules())

    def not_here(_directory: Path) -> object:
        raise AssertionError("compiled in the server's process")

    monkeypatch.setattr(loading, "load_policy_set", not_here)
    write_rules(tmp_path, preset_rules() + keyword_rules(5).removeprefix("rules:\n"))
    result = asyncio.run(engine.reload_off_loop(announce=False))
    assert result.ok and result.version != result.previous_version
    out, _ = stream(engine, list("mail jane.doe@example.com now"))  # the worker's databases scan here
    assert out == "mail [EMAIL] now"

    write_rules(tmp_path, "rules:\n  - {id: bad, description: b, kind: regex, pattern: 'a+', action: redact}\n")
    rejected = asyncio.run(engine.reload_off_loop(announce=False))
    assert not rejected.ok and rejected.error is not None
    assert (rejected.error.rule_id, rejected.error.field) == ("bad", "max_len")
    assert engine.active.version == result.version  # the last good set stays


def test_reload_falls_back_to_a_thread_when_the_worker_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(tmp_path, preset_rules())

    async def broken(_directory: Path) -> object:
        raise loading.WorkerFailed("exit 1: no interpreter")

    monkeypatch.setattr(loading, "_compile_in_worker", broken)
    write_rules(tmp_path, keyword_rules(3))
    result = asyncio.run(engine.reload_off_loop(announce=False))
    assert result.ok and len(engine.active.rules) == 3
