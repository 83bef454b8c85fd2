"""Alignment efficacy: a simulated user with a clear preference drives the real system over HTTP, round by round.

    .venv/bin/python -m bench.closed_loop [--rounds 5] [--train 48] [--heldout 40] [--preference house-style]
        [--align-env SECONDSTAGE_LEARNING_RATE=2e-3 ...]

One secondstage server (default policies, Redis logging) on the demo model. Each round:
chat on the training prompts → the simulated user gives feedback on every answer (thumbs up when it likes
it, else thumbs down with a correction) → `secondstage align run` (a subprocess, as an operator runs it) →
wait until the server serves the new version → ask the HELD-OUT prompts (never trained on). Per round:

- **preferred**: share of held-out answers the user prefers;
- **content kept**: share of held-out answers equal to the base model's own answer (asked on this machine, in
  round 0) in the preferred form — did the content survive the training, not only the style;
- **compliance**: share of responses whose completion record in Redis has no enforced output-policy decision
  (no redaction, no block);
- **content kept (stable)**: the same on the held-out prompts whose base answer is no close call (every token
  leads the runner-up by ≥ CLOSE_CALL log-prob in round 0);
- **degenerate**: share of held-out answers that hit max_tokens without ending their turn, or repeat one
  phrase three times in a row (`degenerate`);
- feedback events used and the round's time.

The simulated user (--user) is content-aware by default: it remembers what the base model answered to each training
prompt (round 1's chats) and likes an answer only when it is the preferred form of that answer; otherwise it gives a
thumbs-down with that preferred form as the correction — a styled answer whose content broke is corrected, not
liked. `--user form-only` likes any answer in the preferred form (the bench before issue 9).

Round 0 is the base model. Stops early once preferred ≥ --stop-at and content kept ≥ --keep-at. Prompts are the
demo model's own question space (serve/demo/data/facts.json), split into train and held-out sets by a fixed seed.
`--align-env NAME=VALUE` passes align settings to `align run` (the ablation in docs/performance.md); the per-user
cap (SECONDSTAGE_MAX_ROWS_PER_USER) is lifted, since one simulated identity posts every event; the held-out
evaluation requests are deleted from the completion log after they are scored, so nothing align reads from the
log (e.g. replay rows) can come from a held-out prompt.

The preference is pluggable: --preference NAME (built in: house-style, house-style-certainly, shout, sign-off) or
--preference module:Class for any class with `prefers(prompt, answer) -> bool` and
`improve(prompt, answer) -> str`. Writes bench/results/closed_loop.json (closed_loop_<label or preference>.json
for another preference or --label).
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
from pathlib import Path
from typing import Any, Protocol

import httpx
import redis
import yaml
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


@dataclass
class Shout:
    """Answers must be in capitals (a tone preference that rewrites every word, not a prefix or suffix).

    The correction is the same answer upper-cased, so "content kept" asks whether the model still says what the
    base model said, only shouted. The demo model shouts under a "shout" system prompt but never unprompted.
    """

    def prefers(self, prompt: str, answer: str) -> bool:
        return any(c.isalpha() for c in answer) and answer.strip() == answer.strip().upper()

    def improve(self, prompt: str, answer: str) -> str:
        return answer.strip().upper()


@dataclass
class SignOff:
    """Answers must end with a sign-off sentence: the model has to go on where it used to stop, then stop."""

    phrase: str = " Ask me anything else."

    def prefers(self, prompt: str, answer: str) -> bool:
        return answer.strip().endswith(self.phrase.strip())

    def improve(self, prompt: str, answer: str) -> str:
        body = answer.strip()
        if body.endswith(self.phrase.strip()):
            return body
        return body + self.phrase


PREFERENCES: dict[str, Any] = {
    "house-style": lambda: HouseStyle(),
    # A phrase the demo model never saw at all: a harder target.
    "house-style-certainly": lambda: HouseStyle("Certainly! "),
    "shout": lambda: Shout(),
    "sign-off": lambda: SignOff(),
}


CLOSE_CALL = 0.5
"""A base answer is a close call when some token of it (end of turn included) leads the runner-up by less than this
(logits, = the log-prob difference): on the demo model about half of the held-out answers are, and any change of
the weights may turn them. `content kept (stable)` counts the others only."""


def degenerate(text: str, finish_reason: str | None) -> bool:
    """A degenerate answer: it ran to max_tokens without ending its turn, or repeats one phrase ≥ 3 times in a row.

    Every answer the demo model was trained on ends within ~25 tokens, so hitting the limit means it did not stop.
    """
    if finish_reason == "length":
        return True
    words = text.split()
    for n in range(1, 9):  # up to 8-word phrases: a repeated sign-off sentence is a loop too
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return True
    return False


def instructions_message(policies_dir: Path = ROOT / "policies") -> list[dict[str, str]]:
    """The system message the default policies put in front of every request (what the server's engine sees)."""
    texts = []
    for path in sorted(policies_dir.glob("*.yaml")):
        for rule in (yaml.safe_load(path.read_text()) or {}).get("rules") or []:
            if rule.get("kind") == "instructions" and rule.get("mode", "enforce") == "enforce":
                texts.append(str(rule["text"]).strip())
    return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []


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


def all_prompts() -> list[str]:
    """Every question the demo model was trained on, in a fixed order."""
    from serve.demo.dialogues import facts, qa_pairs

    return [q for q, _ in qa_pairs(facts())]


def _align_report(stdout: str) -> dict[str, Any] | None:
    """The last JSON object `align run --json` printed, or None (a crash before it printed one)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return None


def split_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    questions = all_prompts()
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
    finish_reason: str | None = None
    min_gap: float | None = None
    """With `gaps`: the smallest lead of a chosen token over the runner-up along the answer (log-probs)."""


def _min_gap(logprobs: dict[str, Any] | None) -> float | None:
    gaps = [
        t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"]
        for t in (logprobs or {}).get("content") or []
        if len(t.get("top_logprobs") or []) >= 2
    ]
    return min(gaps) if gaps else None


async def ask_all(
    url: str, prompts: list[str], max_tokens: int, concurrency: int = 8, gaps: bool = False
) -> list[Answer]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(prompt: str) -> Answer:
            body = {
                "model": "demo",
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            if gaps:
                body |= {"logprobs": True, "top_logprobs": 2}
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            data = r.json()
            choice = data["choices"][0]
            return Answer(
                prompt,
                data["id"],
                choice["message"]["content"],
                data["system_fingerprint"],
                choice["finish_reason"],
                _min_gap(choice.get("logprobs")) if gaps else None,
            )

        return list(await asyncio.gather(*[one(p) for p in prompts]))


def likes(pref: Preference, prompt: str, answer: str, reference: dict[str, str] | None) -> bool:
    """The simulated user likes the preferred form; a content-aware one (`reference`: what the model first said to
    each prompt) only when it is the preferred form of that first answer — broken content gets corrected too."""
    if not pref.prefers(prompt, answer):
        return False
    return reference is None or prompt not in reference or answer.strip() == pref.improve(prompt, reference[prompt])


def correction(pref: Preference, prompt: str, answer: str, reference: dict[str, str] | None) -> str:
    """What the user writes instead: the preferred form of the model's first answer (content-aware) or of this one."""
    source = reference[prompt] if reference is not None and prompt in reference else answer
    return pref.improve(prompt, source)


async def give_feedback(
    url: str, answers: list[Answer], pref: Preference, reference: dict[str, str] | None = None
) -> dict[str, int]:
    counts = {"up": 0, "down_with_correction": 0}
    async with httpx.AsyncClient(timeout=30) as client:
        for a in answers:
            if likes(pref, a.prompt, a.text, reference):
                body: dict[str, Any] = {"completion_id": a.id, "thumbs": "up", "user": "sim"}
                counts["up"] += 1
            else:
                body = {
                    "completion_id": a.id,
                    "thumbs": "down",
                    "correction": correction(pref, a.prompt, a.text, reference),
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


def forget(client: redis.Redis, keys: Keys, ids: list[str]) -> int:
    """Delete the completion records of `ids` (lookup keys and stream entries): the evaluator's requests are not
    user traffic, and align must not learn from a held-out prompt through the completion log."""
    wanted = set(ids)
    stream_ids = []
    for entry_id, fields in client.xrange(keys.completions):
        cid = fields.get(b"id")
        if cid is not None and cid.decode() in wanted:
            stream_ids.append(entry_id)
    if stream_ids:
        client.xdel(keys.completions, *stream_ids)
    if ids:
        client.delete(*(keys.completion(cid) for cid in ids))
    return len(stream_ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="most align rounds")
    p.add_argument("--train", type=int, default=48, help="training prompts per round (one feedback event each)")
    p.add_argument("--heldout", type=int, default=40, help="held-out prompts evaluated after every round")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length limit")
    p.add_argument("--preference", default="house-style", help="built-in name or module:Class")
    p.add_argument("--stop-at", type=float, default=0.9, help="stop once the held-out preferred rate reaches this…")
    p.add_argument("--keep-at", type=float, default=0.8, help="…and the held-out content kept reaches this")
    p.add_argument("--seed", type=int, default=0, help="train/held-out split seed")
    p.add_argument(
        "--align-timeout", type=float, default=2400, help="seconds one align run may take (14 min seen under load)"
    )
    p.add_argument(
        "--align-env", action="append", default=[], metavar="NAME=VALUE", help="align setting for `align run`"
    )
    p.add_argument(
        "--user",
        choices=("content-aware", "form-only"),
        default="content-aware",
        help="content-aware: likes only the preferred form of what the base model said, and corrects to it; "
        "form-only: likes any answer in the preferred form (a styled but broken answer gets a thumbs-up)",
    )
    p.add_argument("--label", default=None, help="name of the results file (default: the preference)")
    args = p.parse_args()
    if args.train > 200:
        p.error(f"--train {args.train}: the goal allows at most 200 feedback events per round")
    if args.rounds < 1 or args.train < 4 or args.heldout < 1:
        p.error("--rounds ≥ 1, --train ≥ 4 (align's min_feedback) and --heldout ≥ 1 are required")
    align_env = {}
    for item in args.align_env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("SECONDSTAGE_"):
            p.error(f"--align-env {item!r}: expected SECONDSTAGE_NAME=VALUE")
        align_env[name] = value
    # The simulated user stands for the many users of a real deployment, but posts every event under one identity:
    # align's per-user cap (max_rows_per_user, 50 by default, a guard against one poisoner) would train on 50 of a
    # round's events and leave the rest for later rounds. The cap is lifted to max_rows_per_run unless set
    # explicitly. (It was also what kept a refused round from starving the next: the cap used to keep the oldest
    # entries, the refused ones; it now keeps each identity's newest, align/feedback.py.)
    align_env.setdefault("SECONDSTAGE_MAX_ROWS_PER_USER", "10000")

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
                reference: dict[str, str] = {}  # training prompt → the base model's answer (content-aware user)

                stable: set[str] = set()  # held-out prompts whose base answer is no close call (CLOSE_CALL)

                def evaluate() -> dict[str, Any]:
                    answers = asyncio.run(ask_all(server.url, heldout, args.max_tokens, gaps=not wanted))
                    n = len(answers)
                    comp = compliance(client, keys, [a.id for a in answers])
                    forget(client, keys, [a.id for a in answers])
                    if not wanted:
                        wanted.update({a.prompt: pref.improve(a.prompt, a.text) for a in answers})
                        stable.update(a.prompt for a in answers if a.min_gap is not None and a.min_gap >= CLOSE_CALL)
                    kept = [a for a in answers if a.text.strip() == wanted[a.prompt]]
                    return {
                        "version": ",".join(sorted({a.version for a in answers})),
                        "heldout_rate": sum(pref.prefers(a.prompt, a.text) for a in answers) / n,
                        # The preference only looks at the form; this says whether the content survived training.
                        "content_kept": len(kept) / n,
                        "content_kept_stable": sum(a.prompt in stable for a in kept) / len(stable) if stable else None,
                        "stable_prompts": len(stable),
                        "similarity": sum(
                            difflib.SequenceMatcher(None, a.text.strip(), wanted[a.prompt]).ratio() for a in answers
                        )
                        / n,
                        "degenerate": sum(degenerate(a.text, a.finish_reason) for a in answers) / n,
                        "hit_max_tokens": sum(a.finish_reason == "length" for a in answers) / n,
                        "compliance": comp,
                        "samples": [a.text for a in answers[:4]],
                    }

                t0 = time.monotonic()
                rounds.append({"round": 0, **evaluate(), "feedback_events": 0, "round_s": time.monotonic() - t0})
                _print_round(rounds[-1])
                for r in range(1, args.rounds + 1):
                    t0 = time.monotonic()
                    chats = asyncio.run(ask_all(server.url, train, args.max_tokens))
                    train_rate = sum(pref.prefers(a.prompt, a.text) for a in chats) / len(chats)
                    if args.user == "content-aware" and not reference:
                        reference.update({a.prompt: a.text for a in chats})  # round 1: the base model's answers
                    counts = asyncio.run(
                        give_feedback(server.url, chats, pref, reference if args.user == "content-aware" else None)
                    )
                    before = _active(client, keys)
                    time.sleep(1.0)  # the log writer is asynchronous; align reads what reached Redis
                    ta = time.monotonic()
                    run = subprocess.run(
                        [PYTHON, "-m", "core.cli", "align", "run", "--json"],
                        env={**server.env, **align_env},
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=args.align_timeout,
                    )
                    align_s = time.monotonic() - ta
                    after = _active(client, keys)
                    swap_s = wait_for_version(server.url, after) if after != before else None
                    result = evaluate()
                    train_comp = compliance(client, keys, [a.id for a in chats])
                    rounds.append(
                        {
                            "round": r,
                            **result,
                            "published": after if after != before else None,
                            "align_exit": run.returncode,
                            "align_tail": run.stderr.strip().splitlines()[-3:],
                            # The run's --json object (gate checks, training metrics such as dpo_liked_leading).
                            "align_report": _align_report(run.stdout),
                            "align_s": align_s,
                            "swap_s": swap_s,
                            "train_rate_before": train_rate,
                            "feedback_events": sum(counts.values()),
                            "feedback": counts,
                            "train_compliance": train_comp,
                            "round_s": time.monotonic() - t0,
                        }
                    )
                    _print_round(rounds[-1])
                    if result["heldout_rate"] >= args.stop_at and result["content_kept"] >= args.keep_at:
                        break
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rounds[0]["heldout_rate"]
    reached = next((x["round"] for x in rounds if x["heldout_rate"] >= 0.9 and x["content_kept"] >= 0.8), None)
    comp_rates = [x["compliance"]["rate"] for x in rounds if x["compliance"]["rate"] is not None]
    goals = {
        "preferred_ge_0.90_and_kept_ge_0.80_within_5_rounds": reached is not None and reached <= 5,
        "feedback_le_200_per_round": all(x["feedback_events"] <= 200 for x in rounds),
        "compliance_not_dropping": bool(comp_rates) and min(comp_rates) >= comp_rates[0],
        "degeneration_not_rising": all(x["degenerate"] <= rounds[0]["degenerate"] for x in rounds),
    }
    title = f"Closed loop: {args.preference!r}, {len(train)} train / {len(heldout)} held-out prompts"
    t = Table(title=title + (f", {align_env}" if align_env else ""))
    cols = ("round", "version", "preferred", "content kept", "kept (stable)", "compliance", "degenerate", "events")
    for col in (*cols, "align s", "swap s", "round s"):
        t.add_column(col, justify="left" if col in ("round", "version") else "right")
    for x in rounds:
        t.add_row(
            str(x["round"]),
            x["version"],
            f"{x['heldout_rate']:.0%}",
            f"{x['content_kept']:.0%}",
            "-" if x.get("content_kept_stable") is None else f"{x['content_kept_stable']:.0%}",
            "-" if x["compliance"]["rate"] is None else f"{x['compliance']['rate']:.0%}",
            f"{x['degenerate']:.0%}",
            str(x["feedback_events"]),
            f"{x['align_s']:.0f}" if "align_s" in x else "-",
            f"{x['swap_s']:.2f}" if x.get("swap_s") is not None else "-",
            f"{x['round_s']:.0f}",
        )
    console.print(t)
    console.print(
        f"base rate {base:.0%}; preferred ≥ 90% with content kept ≥ 80% in round {reached}; "
        f"total {time.monotonic() - t_start:.0f}s"
    )
    console.print(f"goals: {goals}")
    # The default run keeps the name bench.run_all and bench.plot read.
    label = args.label or ("" if args.preference == "house-style" else args.preference.replace(":", "_"))
    path = write_result(
        f"closed_loop_{label}" if label else "closed_loop",
        {
            "params": vars(args),
            "train_prompts": train,
            "heldout_prompts": heldout,
            "rounds": rounds,
            "base_rate": base,
            "reached_goal_in_round": reached,
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
        f"content kept {x['content_kept']:.0%}, degenerate {x['degenerate']:.0%}, "
        f"feedback {x['feedback_events']}, compliance {'-' if comp is None else f'{comp:.0%}'}, "
        f"{x['round_s']:.0f}s  e.g. {x['samples'][0]!r}"
    )


if __name__ == "__main__":
    main()
