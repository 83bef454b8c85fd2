"""Operator rule policies: rule files, the engine that enforces them, and its streaming filter.

Shared by serve (enforces them on every request) and align (checks generated samples and corrections).

Public API (what the chat service uses):

    engine = PolicyEngine(Path("policies"), registry=registry, tokenizer_count=count)
    engine.load()                                   # PolicyError: refuse to start
    res = engine.check_input(messages, RequestContext(api_key, user, model), max_tokens)
    f = engine.output_filter(ctx)                   # per choice: f.feed(delta) / f.finish(), send step.text
    engine.policy_pair(messages, f.original_text, f.final_text, f.decisions)
    engine.check_correction(text)                   # feedback corrections, before they may train
"""

from core.policy.correction import CorrectionCheck, check_correction
from core.policy.engine import PolicyEngine
from core.policy.errors import PolicyError
from core.policy.loading import PolicySet, load_policy_set
from core.policy.results import Decision, InputResult, ReloadResult
from core.policy.scope import RequestContext
from core.policy.stream import FilterStep, OutputFilter

__all__ = [
    "CorrectionCheck",
    "Decision",
    "FilterStep",
    "InputResult",
    "OutputFilter",
    "PolicyEngine",
    "PolicyError",
    "PolicySet",
    "ReloadResult",
    "RequestContext",
    "check_correction",
    "load_policy_set",
]
