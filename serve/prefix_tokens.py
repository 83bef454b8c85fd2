"""Token ids of a templated chat prompt, with the leading system messages' tokens computed once per process.

Most requests on a server start the same way: the operator's instructions (the default policies add a
~90-token system message to every request) or an application's own system prompt. Tokenizing them again for
every request was the largest single cost of a short request in the API process (py-spy: ~23% of a one-token
request's samples; docs/performance.md). vLLM's renderer and transformers have no cache for it (vLLM's prefix
cache saves the *prefill* of those tokens in the engine, not their tokenization in the frontend), hence this.

Why splitting is exact: a fast (Rust `tokenizers`) tokenizer cuts the text at its added tokens (`<|end|>`,
`<|im_start|>`…) before normalizing and pre-tokenizing, and tokenizes each piece between them on its own. So
the ids of `prefix + tail`, where the prefix ends with an added token, are the prefix's ids followed by those
of the tail *as it follows that token*. The tail is tokenized behind the same added token (the "anchor") and
the anchor's ids dropped, so a piece's position (SentencePiece's "prepend ▁ to the first piece only") and the
anchor's own whitespace rules (`rstrip`, `single_word`) apply as they do in the whole text. Every prefix is
checked once against a whole-text encode when learnt, and every use checks that the tail still begins with the
anchor's ids; anything unexpected — a slow tokenizer, a template that renders the system message elsewhere, a
mismatch — falls back to tokenizing the whole text, so the ids are always those of `tokenizer.encode(text)`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

ENTRIES = 256
"""Distinct leading system messages remembered (least recently used dropped first): one per application."""


@dataclass(frozen=True)
class _Prefix:
    text: str
    """The templated prompt's beginning, up to and including `anchor`."""
    ids: list[int]
    anchor: str
    """The added token the prefix ends with; the tail is tokenized behind it."""
    anchor_ids: list[int]


_UNSPLITTABLE = object()
"""Cached for a system prompt whose split did not reproduce the whole-text ids: always tokenize it whole."""


class PrefixTokens:
    """`encode(text, messages)`: the ids of the templated `text` of `messages`, as `tokenizer.encode` gives them."""

    def __init__(self, tokenizer: Any, entries: int = ENTRIES) -> None:
        self.tokenizer = tokenizer
        self.entries = entries
        # Only the Rust tokenizers cut at added tokens first; a slow (Python) tokenizer is tokenized whole.
        self.enabled = getattr(tokenizer, "is_fast", False) is True and hasattr(tokenizer, "get_added_vocab")
        self._added: list[str] = sorted(tokenizer.get_added_vocab(), key=len, reverse=True) if self.enabled else []
        self._cache: OrderedDict[tuple[str, ...], _Prefix | object] = OrderedDict()

    def encode(self, text: str, messages: list[dict[str, Any]]) -> list[int]:
        key = self._key(messages)
        if key is None:
            return self._whole(text)
        entry = self._cache.get(key)
        if isinstance(entry, _Prefix) and text.startswith(entry.text):
            self._cache.move_to_end(key)
            ids = self._tail(entry, text)
            if ids is not None:
                return ids
        elif entry is _UNSPLITTABLE:
            return self._whole(text)
        # Not seen, or the template now renders it differently (a date in the system block): learn it again.
        ids = self._whole(text)
        self._cache[key] = self._learn(messages[: len(key)], text, ids)
        self._cache.move_to_end(key)
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)
        return ids

    def _key(self, messages: list[dict[str, Any]]) -> tuple[str, ...] | None:
        """The leading system messages' contents, when they are plain text and something follows them."""
        if not self.enabled:
            return None
        lead: list[str] = []
        for message in messages:
            if message.get("role") != "system":
                break
            content = message.get("content")
            # Any other field (a name) may reach the template: such messages are not cached.
            if not isinstance(content, str) or len(message) != 2:
                return None
            lead.append(content)
        return tuple(lead) if lead and len(lead) < len(messages) else None

    def _whole(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _tail(self, entry: _Prefix, text: str) -> list[int] | None:
        tail = self._whole(entry.anchor + text[len(entry.text) :])
        n = len(entry.anchor_ids)
        if tail[:n] != entry.anchor_ids:
            return None  # the tail's start merged into the anchor (a longer added token): tokenize whole
        return entry.ids + tail[n:]

    def _learn(self, lead: list[dict[str, Any]], text: str, ids: list[int]) -> _Prefix | object:
        """The prefix of `text` the system messages render to, cut after its last added token — if that comes
        after their text and splitting there reproduces `ids` (the whole text's ids)."""
        try:
            rendered = self.tokenizer.apply_chat_template(lead, add_generation_prompt=False, tokenize=False)
        except Exception:  # a template that refuses a conversation of system messages only
            return _UNSPLITTABLE
        if not isinstance(rendered, str):
            return _UNSPLITTABLE
        # The cut must come after the last system message's text, or the split saves nothing worth an extra encode.
        content = lead[-1]["content"]
        at = rendered.rfind(content)
        if at < 0:
            return _UNSPLITTABLE
        end, anchor, least = 0, "", at + len(content)
        for token in self._added:  # longest first: of two ending at the same place, the longer is the token
            at = rendered.rfind(token)
            if at >= 0 and at + len(token) > end:
                end, anchor = at + len(token), token
        if not anchor or end < least or not text.startswith(rendered[:end]):
            return _UNSPLITTABLE
        entry = _Prefix(rendered[:end], self._whole(rendered[:end]), anchor, self._whole(anchor))
        if entry.ids[-len(entry.anchor_ids) :] != entry.anchor_ids or self._tail(entry, text) != ids:
            return _UNSPLITTABLE
        return entry
