"""Model versions: immutable directories on disk plus a registry in Redis.

A version is `var/models/versions/<name>/` holding `adapter/` (a PEFT LoRA
adapter) and `manifest.json` (lineage and metrics: the `Manifest` record of
core/records.py, re-exported here). It is written to a temporary directory and
renamed into place, so a reader never sees half a version. The
registry (a Redis hash of manifests, the active-version key and the events
channel) is what serving follows; `BASE` means the base model with no adapter.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import msgspec
import redis

from core.keys import Keys
from core.records import BASE, Manifest, RecordError, decode, encode

__all__ = ["BASE", "Manifest", "Registry", "VersionError", "VersionStore", "check_name", "version_number"]

_NAME = re.compile(r"^v(\d+)$")


class VersionError(Exception):
    """A version that does not exist or cannot be used."""


def check_name(name: str) -> str:
    """`name` if it is `base` or a registry name (`v<number>`); VersionError otherwise (it may come from Redis)."""
    if name != BASE and not _NAME.fullmatch(name):
        raise VersionError(f"version name {name[:80]!r} is not `{BASE}` or v<number> (e.g. v3); refusing it")
    return name


def version_number(name: str) -> int:
    m = _NAME.match(name)
    return int(m.group(1)) if m else 0


class VersionStore:
    """The versions directory on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, version: str) -> Path:
        """The version's directory; VersionError for a name that is not v<number> or a path leaving the root."""
        check_name(version)
        root = self.root.resolve()
        path = (root / version).resolve()
        if path.parent != root:  # e.g. a symlink pointing elsewhere
            raise VersionError(f"version {version!r} resolves to {path}, outside the versions root {root}")
        return path

    def adapter_path(self, version: str) -> Path:
        return self.path(version) / "adapter"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if (p / "manifest.json").is_file()]
        return sorted(found, key=version_number)

    def next_name(self) -> str:
        return f"v{max([0, *map(version_number, self.names())]) + 1}"

    def manifest(self, version: str) -> Manifest:
        path = self.path(version) / "manifest.json"
        if not path.is_file():
            raise VersionError(f"version {version!r} has no manifest at {path}")
        try:
            return decode(path.read_bytes(), Manifest)
        except RecordError as exc:
            raise VersionError(f"version {version!r} has an unreadable manifest at {path}: {exc}") from exc

    def write(self, manifest: Manifest, adapter_dir: Path) -> Path:
        """Copy the adapter and manifest into place atomically (rename of a complete directory)."""
        final = self.path(manifest.version)
        if final.exists():
            raise VersionError(f"version {manifest.version!r} already exists at {final}; versions are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}-", dir=self.root))
        try:
            shutil.copytree(adapter_dir, tmp / "adapter")
            (tmp / "manifest.json").write_bytes(msgspec.json.format(encode(manifest), indent=2))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


class Registry:
    """The Redis side: registered manifests, the active version, the events channel."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def register(self, manifest: Manifest) -> None:
        self.client.hset(self.keys.versions, manifest.version, encode(manifest))

    def manifests(self) -> dict[str, Manifest]:
        raw = self.client.hgetall(self.keys.versions)
        out = {k.decode() if isinstance(k, bytes) else k: decode(v, Manifest) for k, v in raw.items()}
        return dict(sorted(out.items(), key=lambda kv: version_number(kv[0])))

    def active(self) -> str:
        """The promoted version (the incumbent): what everyone is served outside a canary, and what align
        trains from; a canary (core/canary.py) never is it until promoted."""
        value = self.client.get(self.keys.active_version)
        if value is None:
            return BASE
        return value.decode() if isinstance(value, bytes) else str(value)

    def activate(self, version: str) -> None:
        """Make `version` the one new requests use, and tell every server now."""
        if version != BASE and not self.client.hexists(self.keys.versions, version):
            known = ", ".join([BASE, *self.manifests()])
            raise VersionError(f"unknown version {version!r}; known versions: {known}")
        # One atomic step (core/canary.py) that also ends a running canary and records the event.
        from core.canary import Rollout

        Rollout(self.client, self.keys).activate(version)
