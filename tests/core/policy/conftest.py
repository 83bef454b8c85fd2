"""Helpers for the policy tests: write a rule directory, build an engine on a fresh registry."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.policy import PolicyEngine, RequestContext

CTX = RequestContext(api_key="key-1", user="alice", model="demo")


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
