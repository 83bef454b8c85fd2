"""The policy package's one error type: an invalid rule set, located by file, rule id and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PolicyError(Exception):
    """A rule set that cannot be loaded. `str()` reads `file: rule 'id': field 'f': what is wrong`."""

    def __init__(
        self, message: str, *, file: str | Path | None = None, rule_id: str | None = None, field: str | None = None
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.rule_id = rule_id
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.rule_id:
            where.append(f"rule {self.rule_id!r}")
        if self.field:
            where.append(f"field {self.field!r}")
        return ": ".join([*where, self.message])

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its fields (a reload compiles in a worker process and sends the error back).
        return (_rebuild, (self.message, self.file, self.rule_id, self.field))

    def to_dict(self) -> dict[str, str | None]:
        return {"message": self.message, "file": self.file, "rule_id": self.rule_id, "field": self.field}


def _rebuild(message: str, file: str | None, rule_id: str | None, field: str | None) -> PolicyError:
    return PolicyError(message, file=file, rule_id=rule_id, field=field)
