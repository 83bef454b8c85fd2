"""Alignment efficacy: a simulated user with a clear preference drives the real system over HTTP, round by round.

    .venv/bin/python -m bench.closed_loop [--rounds 5] [--train 64] [--heldout 40] [--preference house-style]

One secondstage server (default policies, Redis logging) on the demo model. Each round:
chat on the training prompts → the simulated user gives feedback on every answer (thumbs up when it likes
it, else thumbs down with a correction) → `secondstage align run` (a subprocess, as an operator runs it) →
wait until the server serves the new version → ask the HELD-OUT prompts (never trained on) and count the
answers the user prefers. Per round: preferred rate on held-out prompts, feedback events used, the round's
time, and policy compliance (share of responses whose completion record in Redis has no enforced
output-policy decision: no redaction, no block). Round 0 is the base model. Stops early once the rate
reaches --stop-at. "= corrected base" is the share of held-out answers equal to the base model's answer as
the user would have corrected it (did the content survive, not only the style). Prompts are the demo
model's own question space (serve/demo/data/facts.json), split into train and held-out sets by a fixed seed.

The preference is pluggable: --preference NAME (built in: house-style, house-style-certainly) or
--preference module:Class for any class with `prefers(prompt, answer) -> bool` and
`improve(prompt, answer) -> str`. Writes bench/results/closed_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import redis
from rich.console import Console
from rich.table import Table

from bench.harness import PYTHON, ROOT, ensure_demo_model, running, secondstage_server, short_tmpdir
from bench.results import write_result
from core.keys import Keys
from core.redis_server import PrivateRedis

console = Console(width=130)


class Preference(Protocol):
    """What the simulated user wants."""

    def prefers(self, prompt: str, answer: str) -> bool: ...

    def improve(self, prompt: str, answer: str) -> str: ...


@dataclass
class HouseStyle:
    """Answers must open with a house-style phrase; the correction is the same answer with the phrase in front.

    The demo model knows "Arr, matey! " (it learned it under a pirate system prompt) but never says it
    unprompted, so the base rate is ~0.
    """

    phrase: str = "Arr, matey! "

    def prefers(self, prompt: str, answer: str) -> bool:
        return answer.strip().startswith(self.phrase.strip())

    def improve(self, prompt: str, answer: str) -> str:
        body = answer.strip()
        if body.startswith(self.phrase.strip()):
            return body
        return self.phrase + body


PREFERENCES: dict[str, Any] = {
    "house-style": lambda: HouseStyle(),
    # A phrase the demo model never saw at all: a harder target.
    "house-style-certainly": lambda: HouseStyle("Certainly! "),
}


def load_preference(spec: str) -> Preference:
    if spec in PREFERENCES:
        return PREFERENCES[spec]()  # type: ignore[no-any-return]
    if ":" not in spec:
        raise SystemExit(f"--preference {spec!r} is neither a built-in ({', '.join(PREFERENCES)}) nor module:Class")
    module, _, attr = spec.partition(":")
    pref = getattr(importlib.import_module(module), attr)()
    for method in ("prefers", "improve"):
        if not callable(getattr(pref, method, None)):
            raise SystemExit(f"--preference {spec!r}: {type(pref).__name__} has no {method}(prompt, answer) method")
    return pref  # type: ignore[no-any-return]


def split_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    from serve.demo.dialogues import facts, qa_pairs

    questions = [q for q, _ in qa_pairs(facts())]
    random.Random(seed).shuffle(questions)
    if n_train + n_heldout > len(questions):
        raise SystemExit(
            f"--train {n_train} + --heldout {n_heldout} exceeds the {len(questions)} demo prompts; ask for fewer"
        )
    return questions[n_heldout : n_heldout + n_train], questions[:n_heldout]


@dataclass
class Answer:
    prompt: str
    id: str
    text: str
    version: str


async def ask_all(url: str, prompts: list[str], max_tokens: int, concurrency: int = 8) -> list[Answer]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(prompt: str) -> Answer:
            body = {
                "model": "demo",
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            data = r.json()
            return Answer(prompt, data["id"], data["choices"][0]["message"]["content"], data["system_fingerprint"])

        return list(await asyncio.gather(*[one(p) for p in prompts]))


async def give_feedback(url: str, answers: list[Answer], pref: Preference) -> dict[str, int]:
    counts = {"up": 0, "down_with_correction": 0}
    async with httpx.AsyncClient(timeout=30) as client:
        for a in answers:
            if pref.prefers(a.prompt, a.text):
                body: dict[str, Any] = {"completion_id": a.id, "thumbs": "up", "user": "sim"}
                counts["up"] += 1
            else:
                body = {
                    "completion_id": a.id,
                    "thumbs": "down",
                    "correction": pref.improve(a.prompt, a.text),
                    "user": "sim",
                }
                counts["down_with_correction"] += 1
            r = await client.post(url + "/v1/feedback", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"POST /v1/feedback answered {r.status_code}: {r.text[:300]}")
    return counts


def compliance(client: redis.Redis, keys: Keys, ids: list[str], wait_s: float = 10.0) -> dict[str, Any]:
    """Share of completions whose record shows no enforced output-policy decision (redact, block, ...)."""
    deadline = time.monotonic() + wait_s
    records: dict[str, Any] = {}
    while True:
        for cid in ids:
            if cid not in records and (raw := client.get(keys.completion(cid))) is not None:
                records[cid] = json.loads(raw)
        if len(records) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    violations = 0
    for rec in records.values():
        decisions = (rec.get("policy") or {}).get("decisions") or []
        enforced = [d for d in decisions if d.get("stage") == "output" and d.get("mode") == "enforce"]
        if any(d.get("action") != "flag" for d in enforced):
            violations += 1
    checked = len(records)
    return {
        "rate": (checked - violations) / checked if checked else None,
        "checked": checked,
        "violations": violations,
        "missing_records": len(ids) - checked,
    }


def wait_for_version(url: str, version: str, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            data = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]
            if data.get("version") == version:
                return time.monotonic() - t0
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server did not switch to version {version!r} within {timeout}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="most align rounds")
    p.add_argument("--train", type=int, default=48, help="training prompts per round (one feedback event each)")
    p.add_argument("--heldout", type=int, default=40, help="held-out prompts evaluated after every round")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length limit")
    p.add_argument("--preference", default="house-style", help="built-in name or module:Class")
    p.add_argument("--stop-at", type=float, default=0.9, help="stop once the held-out rate reaches this")
    p.add_argument("--seed", type=int, default=0, help="train/held-out split seed")
    p.add_argument("--align-timeout", type=float, default=900, help="seconds one align run may take")
    args = p.parse_args()
    if args.train > 200:
        p.error(f"--train {args.train}: the goal allows at most 200 feedback events per round")
    if args.rounds < 1 or args.train < 4 or args.heldout < 1:
        p.error("--rounds ≥ 1, --train ≥ 4 (align's min_feedback) and --heldout ≥ 1 are required")

    pref = load_preference(args.preference)
    train, heldout = split_prompts(args.train, args.heldout, args.seed)
    ensure_demo_model()
    work = short_tmpdir("ssbench-loop-")
    keys = Keys()
    rounds: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        with PrivateRedis(work / "redis") as rs:
            server = secondstage_server(
                redis_url=rs.url,
                var_dir=work / "var",
                log=work / "server.log",
                # Each round's version serves everyone at once: this bench measures training, not the canary.
                extra_env={"SECONDSTAGE_RECONCILE_INTERVAL_S": "1", "SECONDSTAGE_CANARY_ENABLED": "false"},
            )
            client = redis.Redis.from_url(rs.url)
            with running(server):
                wanted: dict[str, str] = {}  # held-out prompt → the base answer as the user would correct it

                def evaluate() -> tuple[float, dict[str, Any], str, list[Answer]]:
                    answers = asyncio.run(ask_all(server.url, heldout, args.max_tokens))
                    rate = sum(pref.prefers(a.prompt, a.text) for a in answers) / len(answers)
                    versions = sorted({a.version for a in answers})
                    comp = compliance(client, keys, [a.id for a in answers])
                    if not wanted:
                        wanted.update({a.prompt: pref.improve(a.prompt, a.text) for a in answers})
                    # The preference only looks at style; this says whether the content survived the training.
                    comp["target_exact"] = sum(a.text.strip() == wanted[a.prompt] for a in answers) / len(answers)
                    comp["target_similarity"] = sum(
                        difflib.SequenceMatcher(None, a.text.strip(), wanted[a.prompt]).ratio() for a in answers
                    ) / len(answers)
                    return rate, comp, ",".join(versions), answers

                t0 = time.monotonic()
                rate, comp, version, answers = evaluate()
                rounds.append(
                    {
                        "round": 0,
                        "version": version,
                        "heldout_rate": rate,
                        "compliance": comp,
                        "feedback_events": 0,
                        "round_s": time.monotonic() - t0,
                        "samples": [a.text for a in answers[:3]],
                    }
                )
                _print_round(rounds[-1])
                for r in range(1, args.rounds + 1):
                    t0 = time.monotonic()
                    chats = asyncio.run(ask_all(server.url, train, args.max_tokens))
                    train_rate = sum(pref.prefers(a.prompt, a.text) for a in chats) / len(chats)
                    counts = asyncio.run(give_feedback(server.url, chats, pref))
                    before = _active(client, keys)
                    time.sleep(1.0)  # the log writer is asynchronous; align reads what reached Redis
                    ta = time.monotonic()
                    run = subprocess.run(
                        [PYTHON, "-m", "core.cli", "align", "run"],
                        env=server.env,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=args.align_timeout,
                    )
                    align_s = time.monotonic() - ta
                    after = _active(client, keys)
                    swap_s = wait_for_version(server.url, after) if after != before else None
                    rate, comp, version, answers = evaluate()
                    train_comp = compliance(client, keys, [a.id for a in chats])
                    rounds.append(
                        {
                            "round": r,
                            "version": version,
                            "published": after if after != before else None,
                            "align_exit": run.returncode,
                            "align_tail": (run.stdout + run.stderr).strip().splitlines()[-3:],
                            "align_s": align_s,
                            "swap_s": swap_s,
                            "train_rate_before": train_rate,
                            "feedback_events": sum(counts.values()),
                            "feedback": counts,
                            "heldout_rate": rate,
                            "compliance": comp,
                            "train_compliance": train_comp,
                            "round_s": time.monotonic() - t0,
                            "samples": [a.text for a in answers[:3]],
                        }
                    )
                    _print_round(rounds[-1])
                    if rate >= args.stop_at:
                        break
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rounds[0]["heldout_rate"]
    reached = next((x["round"] for x in rounds if x["heldout_rate"] >= 0.9), None)
    comp_rates = [x["compliance"]["rate"] for x in rounds if x["compliance"]["rate"] is not None]
    goals = {
        "heldout_ge_0.90_within_5_rounds": reached is not None and reached <= 5,
        "feedback_le_200_per_round": all(x["feedback_events"] <= 200 for x in rounds),
        "compliance_not_dropping": bool(comp_rates) and min(comp_rates) >= comp_rates[0],
    }
    t = Table(title=f"Closed loop: {args.preference!r}, {len(train)} train / {len(heldout)} held-out prompts")
    cols = ("round", "version", "held-out preferred", "= corrected base", "feedback events", "align s", "swap s")
    for col in (*cols, "round s", "compliance"):
        t.add_column(col, justify="left" if col in ("round", "version") else "right")
    for x in rounds:
        t.add_row(
            str(x["round"]),
            x["version"],
            f"{x['heldout_rate']:.0%}",
            f"{x['compliance']['target_exact']:.0%}",
            str(x["feedback_events"]),
            f"{x['align_s']:.0f}" if "align_s" in x else "-",
            f"{x['swap_s']:.2f}" if x.get("swap_s") is not None else "-",
            f"{x['round_s']:.0f}",
            "-" if x["compliance"]["rate"] is None else f"{x['compliance']['rate']:.0%}",
        )
    console.print(t)
    console.print(f"base rate {base:.0%}; ≥90% reached in round {reached}; total {time.monotonic() - t_start:.0f}s")
    console.print(f"goals: {goals}")
    path = write_result(
        "closed_loop",
        {
            "params": vars(args),
            "train_prompts": train,
            "heldout_prompts": heldout,
            "rounds": rounds,
            "base_rate": base,
            "reached_90_in_round": reached,
            "total_s": time.monotonic() - t_start,
            "goals": goals,
        },
    )
    console.print(f"wrote {path}")


def _active(client: redis.Redis, keys: Keys) -> str:
    value = client.get(keys.active_version)
    return "base" if value is None else value.decode()


def _print_round(x: dict[str, Any]) -> None:
    comp = x["compliance"]["rate"]
    console.print(
        f"round {x['round']}: version {x['version']}, held-out preferred {x['heldout_rate']:.0%}, "
        f"feedback {x['feedback_events']}, compliance {'-' if comp is None else f'{comp:.0%}'}, "
        f"{x['round_s']:.0f}s  e.g. {x['samples'][0]!r}"
    )


if __name__ == "__main__":
    main()
