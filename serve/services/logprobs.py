"""Log probabilities: vLLM's per-token dicts → OpenAI's chat layout, and chat layout → the legacy completions one.

vLLM gives, per sampled token, `{token_id: Logprob(logprob, rank, decoded_token)}`
holding the sampled token and the top alternatives. OpenAI (and vLLM's server)
clamp -inf to -9999.0 so the value stays valid JSON.
"""

from __future__ import annotations

from typing import Any

from serve.protocol import CompletionLogprobs, TokenLogprob, TopLogprob


def token_logprobs(comp: Any, top_n: int, tokenizer: Any) -> list[TokenLogprob]:
    """The chat layout for the tokens of one vLLM `CompletionOutput` delta, `top_n` alternatives each."""
    result = []
    for token_id, top in zip(comp.token_ids, comp.logprobs, strict=False):
        chosen = top.get(token_id)
        entries = sorted(top.items(), key=lambda kv: kv[1].rank or 0)
        result.append(
            TokenLogprob(
                token=_decoded(token_id, chosen, tokenizer),
                logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                bytes=list(_decoded(token_id, chosen, tokenizer).encode()),
                top_logprobs=[
                    TopLogprob(
                        token=_decoded(t, lp, tokenizer),
                        logprob=max(lp.logprob, -9999.0),
                        bytes=list(_decoded(t, lp, tokenizer).encode()),
                    )
                    for t, lp in entries
                    if lp.rank is not None and lp.rank <= top_n
                ][:top_n],
            )
        )
    return result


def _decoded(token_id: int, lp: Any, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return str(lp.decoded_token)
    return str(tokenizer.decode([token_id]))


def legacy(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Chat-style per-token logprobs → the legacy completions layout, text offsets counted from `offset`."""
    out = CompletionLogprobs()
    pos = offset
    for t in logprobs:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        # OpenAI's legacy layout (and vLLM's) lists the sampled token first, then the top alternatives.
        out.top_logprobs.append({t.token: t.logprob, **{alt.token: alt.logprob for alt in t.top_logprobs}})
        out.text_offset.append(pos)
        pos += len(t.token)
    return out
