"""The prefix-cached prompt tokenizer gives exactly the ids of tokenizing the whole templated text.

Real `tokenizers` tokenizers trained here on a small corpus, each with a chat template: byte-level BPE (GPT-2,
Llama 3 and the demo model's kind) and SentencePiece-style Metaspace with `prepend_scheme="first"` (▁ before the
first piece of the text only: a tail tokenized on its own would differ, behind its anchor it does not), plus
templates the split must refuse (the system message inside the first user turn, a longer added token spanning
the cut) and one whose system block changes (a date).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serve.demo import demo_dialogues
from serve.demo.tokenizer import train_tokenizer
from serve.prefix_tokens import _UNSPLITTABLE, PrefixTokens, _Prefix

CORPUS = [
    "You are a helpful, honest assistant. Never reveal secrets such as API keys or passwords.",
    "Tell me about the weather in the mountains today, please. Ünïcode and 42 numbers too.",
    "The quick brown fox jumps over the lazy dog while seven small birds sing in the trees.",
] * 20
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = "You are a helpful, honest assistant.\n- Never reveal secrets such as API keys."
PIECES = ["hello", " world", "\n", " ", "  ", "<|im_end|>", "<|im_start|>", "Ünï", "42", "the", "x", "\t", "▁"]


def _fast(kind: str, template: str, added: list[str] | None = None) -> PreTrainedTokenizerFast:
    specials = ["<|im_start|>", "<|im_end|>", *(added or [])]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet, specials = [], ["<unk>", *specials]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = template
    return fast


def _conversations(n: int, system: str = SYSTEM) -> list[list[dict[str, Any]]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        user = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25)))
        turns = [{"role": "user", "content": user}]
        if rng.random() < 0.3:
            turns += [{"role": "assistant", "content": "".join(rng.choice(PIECES) for _ in range(5))}, turns[0]]
        out.append([{"role": "system", "content": system}, *turns])
    return out


def _check(tokenizer: Any, conversations: list[list[dict[str, Any]]], prefix: PrefixTokens) -> None:
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prefix.encode(text, messages) == tokenizer.encode(text, add_special_tokens=False), messages


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_split_ids_equal_the_whole_texts(kind: str) -> None:
    tokenizer = _fast(kind, CHATML)
    prefix = PrefixTokens(tokenizer)
    _check(tokenizer, _conversations(200), prefix)
    (entry,) = prefix._cache.values()
    assert isinstance(entry, _Prefix) and entry.anchor == "<|im_end|>"  # the split was used, not the fallback
    assert entry.text.endswith(SYSTEM + "<|im_end|>")


def test_metaspace_tail_differs_alone_so_it_is_tokenized_behind_its_anchor() -> None:
    # Why the anchor: alone, the tail would be the text's first piece and get a ▁ the whole text does not give it.
    tokenizer = _fast("metaspace", CHATML)
    tail = "\n<|im_start|>user\nhello<|im_end|>"
    alone = tokenizer.encode(tail, add_special_tokens=False)
    behind = tokenizer.encode("<|im_end|>" + tail, add_special_tokens=False)[1:]
    assert alone != behind


def test_demo_tokenizer_and_template() -> None:
    demo_tokenizer = train_tokenizer(demo_dialogues()[:50], vocab_size=600)
    prefix = PrefixTokens(demo_tokenizer)
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": c[-1]["content"].replace("im_", "")}]
        for c in _conversations(100)
    ]
    _check(demo_tokenizer, conversations, prefix)
    assert isinstance(next(iter(prefix._cache.values())), _Prefix)


def test_system_inside_the_first_user_turn_is_tokenized_whole() -> None:
    # Llama 2's layout: no added token closes the system message, so no prefix ends at one within it.
    template = (
        "{{ '<|im_start|>' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '[SYS]' + m['content'] + "
        "'[/SYS] ' }}{% else %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
    )
    tokenizer = _fast("metaspace", template)
    prefix = PrefixTokens(tokenizer)
    _check(tokenizer, _conversations(50), prefix)
    assert list(prefix._cache.values()) == [_UNSPLITTABLE]  # only `<|im_start|>`, before the system text, could end it


def test_an_added_token_spanning_the_cut_falls_back() -> None:
    # Messages joined by newlines, and `<|im_end|>\n` a token too: the system message alone ends in `<|im_end|>`,
    # where the whole text holds `<|im_end|>\n`: a cut after `<|im_end|>` would give other ids.
    template = (
        "{% for m in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    )
    tokenizer = _fast("bytelevel", template, added=["<|im_end|>\n"])
    prefix = PrefixTokens(tokenizer)
    _check(tokenizer, _conversations(50), prefix)
    assert list(prefix._cache.values()) == [_UNSPLITTABLE]


def test_a_system_block_that_changes_is_learnt_again() -> None:
    template = CHATML.replace("m['content']", "m['content'] + (' ' + today if m['role'] == 'system' else '')")
    tokenizer = _fast("bytelevel", template)
    prefix = PrefixTokens(tokenizer)
    for day in ("1 Dec", "2 Dec"):
        tokenizer.chat_template = template.replace("today", repr(day))
        _check(tokenizer, _conversations(20), prefix)
        (entry,) = prefix._cache.values()
        assert isinstance(entry, _Prefix) and day in entry.text


def test_no_leading_system_message_or_a_slow_tokenizer_tokenizes_whole() -> None:
    tokenizer = _fast("bytelevel", CHATML)
    prefix = PrefixTokens(tokenizer)
    _check(tokenizer, [c[1:] for c in _conversations(10)], prefix)
    _check(tokenizer, [[{"role": "system", "content": SYSTEM, "name": "ops"}, c[1]] for c in _conversations(5)], prefix)
    assert not prefix._cache

    class Slow:
        is_fast = False

    assert not PrefixTokens(Slow()).enabled


def test_least_recently_used_system_prompts_are_dropped() -> None:
    tokenizer = _fast("bytelevel", CHATML)
    prefix = PrefixTokens(tokenizer, entries=2)
    for system in ("one", "two", "one", "three"):
        _check(tokenizer, _conversations(1, system), prefix)
    assert list(prefix._cache) == [("one",), ("three",)]
