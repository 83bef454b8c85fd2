"""Helpers for the policy tests: write a rule directory, build an engine on a fresh registry."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.policy import PolicyEngine, RequestContext

CTX = RequestContext(api_key="key-1", user="alice", model="demo")

WORDS = str.split("the of and to in is was for on are with as his they at be this from have or by one had not but")


def keyword_rules(n: int, seed: int = 1) -> str:
    """`n` keyword rules whose keywords start with common words: prose keeps beginning them, never matches them."""
    rng = random.Random(seed)
    lines = ["rules:"]
    for i in range(n):
        kws = ", ".join(f"{rng.choice(WORDS)}{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(3))
        lines.append(f"  - {{id: k{i}, description: kw, kind: keywords, keywords: [{kws}], action: redact}}")
    return "\n".join(lines) + "\n"


def write_rules(directory: Path, body: str, name: str = "rules.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def make_engine(tmp_path: Path) -> Callable[..., PolicyEngine]:
    """make_engine(yaml_text, registry=None, tokenizer_count=None) -> a loaded engine on tmp_path/policies."""

    def make(body: str, **kwargs: object) -> PolicyEngine:
        directory = tmp_path / "policies"
        write_rules(directory, body)
        kwargs.setdefault("registry", CollectorRegistry())
        engine = PolicyEngine(directory, **kwargs)  # type: ignore[arg-type]
        engine.load()
        return engine

    return make


def stream(engine: PolicyEngine, chunks: list[str], ctx: RequestContext = CTX) -> tuple[str, object]:
    """Feed chunks through a fresh output filter; returns (emitted text, filter)."""
    f = engine.output_filter(ctx)
    out = []
    for c in chunks:
        step = f.feed(c)
        out.append(step.emit)
        if step.stopped:
            break
    out.append(f.finish().emit)
    return "".join(out), f
