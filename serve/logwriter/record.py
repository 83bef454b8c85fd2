"""`Record`: one stream entry for the log writer, and its line in the spool (JSON).

A record is what the writer appends: stream fields, plus optionally a key to SET for lookup by id
(a completion's JSON is both a stream field and the lookup key's value), and how long Redis keeps it:
`maxlen` (the stream is trimmed to about that many entries) and `ttl_s` (entries older than that are
trimmed from the stream, and the index key expires after it). The JSON line is the spool's format; what
goes to Redis is encoded by the transport (see transport.py).

A Python `str` can hold what UTF-8 cannot encode: a lone surrogate (JSON's `"\\ud800"` decodes to one).
Such a record cannot reach Redis as it is; `sanitised()` is the copy that can (each surrogate replaced by
U+FFFD), and `to_json()` escapes it so the spool keeps it exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# A str holds a surrogate code point only when it is unpaired: JSON's valid pairs decode to one character.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class Record:
    """One stream entry to append, optionally with a key to SET for lookup by id."""

    stream: str
    fields: dict[str, str]
    index_key: str | None = None
    index_value: str | None = None
    maxlen: int | None = None
    ttl_s: int | None = None
    queued_at: float = field(default=0.0, compare=False)
    """When the writer queued it (monotonic seconds): the age of the oldest queued record is a health signal."""

    def __post_init__(self) -> None:
        if (self.index_key is None) != (self.index_value is None):
            raise ValueError(
                f"Record index_key={self.index_key!r} and index_value=<{type(self.index_value).__name__}> "
                "must be given together (both set, or both None)"
            )

    def to_json(self) -> str:
        """The spool line; always encodable as UTF-8 (lone surrogates are kept, as JSON escapes)."""
        d = {
            "s": self.stream,
            "f": self.fields,
            "k": self.index_key,
            "v": self.index_value,
            "m": self.maxlen,
            "t": self.ttl_s,
        }
        # default=str: a stray non-str value must not make the record unspoolable.
        text = json.dumps(d, separators=(",", ":"), ensure_ascii=False, default=str)
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(d, separators=(",", ":"), ensure_ascii=True, default=str)
        return text

    def sanitised(self) -> Record | None:
        """A copy with every lone surrogate replaced by U+FFFD; None when there is none (nothing to fix)."""

        def fix(value: object) -> object:
            return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value

        fields = {fix(k): fix(v) for k, v in self.fields.items()}
        index_value = fix(self.index_value)
        if fields == self.fields and index_value == self.index_value and fix(self.stream) == self.stream:
            return None
        return Record(
            str(fix(self.stream)),
            fields,  # type: ignore[arg-type]  # str in, str out
            None if self.index_key is None else str(fix(self.index_key)),
            None if index_value is None else str(index_value),
            self.maxlen,
            self.ttl_s,
        )

    @classmethod
    def from_json(cls, line: bytes | str) -> Record:
        d = json.loads(line)
        return cls(d["s"], d["f"], d.get("k"), d.get("v"), d.get("m"), d.get("t"))
