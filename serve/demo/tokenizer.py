"""The demo model's tokenizer and chat format: a byte-level BPE trained on the shipped text, with special tokens.

One turn is `<|role|>\\n{content}<|end|>\\n`; `<|end|>` is the end-of-sequence token the model learns to stop at.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from serve.demo.dialogues import Dialogue, data_text
from serve.demo.spec import DemoModelSpec

PAD = "<|pad|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, END, *(f"<|{role}|>" for role in ROLES))

# One turn is `<|role|>\n{content}<|end|>\n`; the generation prompt opens the assistant turn.
# Unknown roles raise, so a caller's mistake is not silently rendered as text the model never saw.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + message['role'] + ': the demo model knows system, user and assistant.') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _tokenizer_texts(dialogues: list[Dialogue]) -> Iterator[str]:
    yield from data_text("corpus.txt").split("\n\n")
    for dialogue in dialogues:
        for message in dialogue:
            yield message["content"]


def train_tokenizer(
    dialogues: list[Dialogue], vocab_size: int, *, max_length: int = DemoModelSpec.max_position_embeddings
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any byte string is encodable) with the chat special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_texts(dialogues), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        model_max_length=max_length,
        padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token (a special token, say); raises if the tokenizer splits it."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"expected one id for token {token!r}, got {found!r}")
    return found
