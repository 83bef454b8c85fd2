"""Delete one identity's data from Redis: `secondstage data purge --key ID | --user ID`.

What goes: every completion the identity made (its stream entry and its lookup key
`<p>:completion:<id>`), every feedback entry on those completions or sent by that user,
and the policy pairs derived from those completions (their prompts are the person's
messages). What stays, and is named instead: the model versions whose manifests list
one of the deleted feedback or policy-pair ids (in Redis and in `versions/*/manifest.json`):
their adapters learned from the data, so the operator retrains without it (and rolls back
or deletes those versions); versions are immutable, so purge does not touch them.

Records are matched on their JSON fields (`key`, `user`), not through the typed decoder,
so a record of another schema version or a damaged one is still found. Lookup keys are
scanned as well as the stream: `stream_maxlen` can trim a stream entry while its key lives
on until its TTL. Records still in a serve replica's disk spool (Redis was down) reach
Redis later: run the purge again once the spools are empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis

from core.keys import Keys
from core.versions import VersionStore

_BATCH = 1000


@dataclass
class PurgeReport:
    """What a purge deleted (or, with dry_run, would delete) and which versions trained on it."""

    completion_ids: list[str] = field(default_factory=list)
    feedback_ids: list[str] = field(default_factory=list)
    policy_pair_ids: list[str] = field(default_factory=list)
    stream_entries: int = 0
    """Stream entries deleted (XDEL) across the three streams."""
    lookup_keys: int = 0
    versions: dict[str, list[str]] = field(default_factory=dict)
    """Version name -> the purged feedback and policy-pair ids its manifest lists."""


def _fields(raw: bytes | str | None) -> dict[str, Any]:
    """A record's JSON as a dict; {} for anything that is not a JSON object."""
    if raw is None:
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _entries(client: redis.Redis, stream: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of a stream, oldest first, read in batches."""
    start = "-"
    while True:
        batch: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream, min=start, count=_BATCH)  # type: ignore[assignment]  # sync client, bytes replies
        yield from batch
        if len(batch) < _BATCH:
            return
        start = "(" + batch[-1][0].decode()  # exclusive: after the last id read


def purge(
    client: redis.Redis,
    keys: Keys,
    store: VersionStore | None,
    *,
    key: str | None = None,
    user: str | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    """Delete the completions, feedback and policy pairs of an API key id or a user; see the module docstring."""
    if (key is None) == (user is None):
        raise ValueError(f"purge needs exactly one of key={key!r} and user={user!r}")

    def mine(record: dict[str, Any]) -> bool:
        return (key is not None and record.get("key") == key) or (user is not None and record.get("user") == user)

    report = PurgeReport()
    completions: set[str] = set()
    doomed: dict[str, list[bytes]] = {keys.completions: [], keys.feedback: [], keys.policy_pairs: []}

    for entry_id, f in _entries(client, keys.completions):
        record = _fields(f.get(b"data"))
        if mine(record):
            completions.add(_text(f.get(b"id")) or str(record.get("id")))
            doomed[keys.completions].append(entry_id)
    # Lookup keys outlive trimmed stream entries (MAXLEN): scan them too.
    lookup: list[str] = []
    pattern = keys.completion("*")
    names = [_text(n) or "" for n in client.scan_iter(match=pattern, count=_BATCH)]
    for i in range(0, len(names), _BATCH):
        chunk = names[i : i + _BATCH]
        for name, raw in zip(chunk, client.mget(chunk), strict=True):
            completion_id = name[len(keys.completion("")) :]
            if completion_id in completions or mine(_fields(raw)):
                completions.add(completion_id)
                lookup.append(name)
    lookup += [keys.completion(c) for c in completions if keys.completion(c) not in lookup]

    feedback: set[str] = set()
    for entry_id, f in _entries(client, keys.feedback):
        record = _fields(f.get(b"data"))
        target = _text(f.get(b"completion_id")) or record.get("completion_id")
        if target in completions or (user is not None and record.get("user") == user):
            feedback.add(_text(f.get(b"id")) or str(record.get("id")))
            doomed[keys.feedback].append(entry_id)
    pairs: set[str] = set()
    for entry_id, f in _entries(client, keys.policy_pairs):
        record = _fields(f.get(b"data"))
        if (_text(f.get(b"completion_id")) or record.get("completion_id")) in completions:
            pairs.add(_text(f.get(b"id")) or str(record.get("id")))
            doomed[keys.policy_pairs].append(entry_id)

    report.completion_ids = sorted(completions)
    report.feedback_ids = sorted(feedback)
    report.policy_pair_ids = sorted(pairs)
    report.versions = _versions_trained_on(client, keys, store, feedback | pairs)
    if dry_run:
        report.stream_entries = sum(len(ids) for ids in doomed.values())
        report.lookup_keys = int(client.exists(*lookup)) if lookup else 0
        return report
    for stream, ids in doomed.items():
        for i in range(0, len(ids), _BATCH):
            report.stream_entries += int(client.xdel(stream, *ids[i : i + _BATCH]))
    for i in range(0, len(lookup), _BATCH):
        report.lookup_keys += int(client.delete(*lookup[i : i + _BATCH]))
    return report


def _versions_trained_on(
    client: redis.Redis, keys: Keys, store: VersionStore | None, ids: set[str]
) -> dict[str, list[str]]:
    """Versions (registered in Redis or on disk) whose manifests list any of `ids`."""
    manifests: dict[str, dict[str, Any]] = {}
    for name, raw in client.hgetall(keys.versions).items():
        manifests[_text(name) or ""] = _fields(raw)
    if store is not None:
        for name in store.names():
            if name not in manifests:
                # Matched on the JSON, like the records: a manifest of another schema still names its ids.
                manifests[name] = _fields((store.path(name) / "manifest.json").read_bytes())
    found: dict[str, list[str]] = {}
    for name, m in manifests.items():
        listed = {str(x) for x in [*m.get("feedback_ids", []), *m.get("policy_pair_ids", [])]}
        if hit := sorted(listed & ids):
            found[name] = hit
    return dict(sorted(found.items(), key=lambda kv: (len(kv[0]), kv[0])))
