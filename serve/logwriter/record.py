"""`Record`: one stream entry for the log writer, and its line in the spool (JSON).

A record is what the writer appends: stream fields, plus optionally a key to SET for lookup by id
(a completion's JSON is both a stream field and the lookup key's value), and how long Redis keeps it:
`maxlen` (the stream is trimmed to about that many entries) and `ttl_s` (entries older than that are
trimmed from the stream, and the index key expires after it). The JSON line is the spool's format; what
goes to Redis is encoded by the transport (see transport.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(slots=True)
class Record:
    """One stream entry to append, optionally with a key to SET for lookup by id."""

    stream: str
    fields: dict[str, str]
    index_key: str | None = None
    index_value: str | None = None
    maxlen: int | None = None
    ttl_s: int | None = None

    def __post_init__(self) -> None:
        if (self.index_key is None) != (self.index_value is None):
            raise ValueError(
                f"Record index_key={self.index_key!r} and index_value=<{type(self.index_value).__name__}> "
                "must be given together (both set, or both None)"
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "s": self.stream,
                "f": self.fields,
                "k": self.index_key,
                "v": self.index_value,
                "m": self.maxlen,
                "t": self.ttl_s,
            },
            separators=(",", ":"),
            ensure_ascii=False,
            default=str,  # a stray non-str value must not make the record unspoolable
        )

    @classmethod
    def from_json(cls, line: bytes | str) -> Record:
        d = json.loads(line)
        return cls(d["s"], d["f"], d.get("k"), d.get("v"), d.get("m"), d.get("t"))
