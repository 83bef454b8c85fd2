"""The Redis data model: every key and channel secondstage uses, under one prefix.

docs/architecture.md describes each; change them only together with that page.
Every stream entry carries `schema` (SCHEMA_VERSION) so readers can evolve.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Keys:
    prefix: str = "secondstage"

    @property
    def completions(self) -> str:
        """Stream: one entry per completion (fields: schema, id, data=JSON record)."""
        return f"{self.prefix}:completions"

    def completion(self, completion_id: str) -> str:
        """String: the JSON record of one completion, for lookup by id (feedback, align)."""
        return f"{self.prefix}:completion:{completion_id}"

    @property
    def feedback(self) -> str:
        """Stream: one entry per feedback event (fields: schema, id, completion_id, data=JSON)."""
        return f"{self.prefix}:feedback"

    @property
    def policy_pairs(self) -> str:
        """Stream: preference pairs derived from enforced output-policy decisions."""
        return f"{self.prefix}:policy_pairs"

    @property
    def versions(self) -> str:
        """Hash: version name -> manifest JSON."""
        return f"{self.prefix}:versions"

    @property
    def active_version(self) -> str:
        """String: the version new requests are served with ("base" = no adapter)."""
        return f"{self.prefix}:active_version"

    @property
    def events(self) -> str:
        """Pub/sub channel: JSON events {"type": "activated", "version": ...}."""
        return f"{self.prefix}:events"

    @property
    def policy_events(self) -> str:
        """Pub/sub channel: JSON {"type": "reload", "origin": replica, "version": ...} after a policy reload
        through the admin API, so every replica reloads its rule files (serve/policy/fanout.py)."""
        return f"{self.prefix}:policy_events"

    @property
    def align_lock(self) -> str:
        """String with TTL: held by the one align job allowed to run."""
        return f"{self.prefix}:align:lock"

    @property
    def rate_limits(self) -> str:
        """Prefix of the per-key rate-limit state (serve/limits.py), shared by every replica, all with TTLs.

        `<this>:{requests|feedback}/<identity>/<limit>/1/minute`: `limits`' moving windows (lists);
        `<this>:{tokens/<identity>/<limit>/1/minute}` and the same `/-1`: its sliding-window counters;
        `<this>:inflight:<identity>`: sorted set of concurrency leases (member = lease id, score = expiry ms).
        """
        return f"{self.prefix}:limits"

    @property
    def api_keys(self) -> str:
        """Hash: API key id -> JSON key entry (name, sha256 of the secret, scopes, limits, created, revoked).

        Never the secret itself; serve's key store (serve/auth/store.py) owns the entry's shape.
        """
        return f"{self.prefix}:api_keys"

    @property
    def canary(self) -> str:
        """Hash: the running canary (version, incumbent, share, since, run); absent = none (core/canary.py)."""
        return f"{self.prefix}:canary"

    def canary_signals(self, run: str) -> str:
        """Hash: live signals of one canary run, fields `<role>.<signal>` (role canary|incumbent), summed by
        every replica; kept a week after the decision."""
        return f"{self.prefix}:canary:signals:{run}"

    @property
    def canary_decisions(self) -> str:
        """Hash: `<decision>.<trigger>` -> count of canary decisions ever made (promote|rollback, auto|operator)."""
        return f"{self.prefix}:canary:decisions"

    @property
    def version_events(self) -> str:
        """Stream: every version event (canary_started, promoted, rolled_back, superseded, activated);
        fields schema, type, version, data=JSON event."""
        return f"{self.prefix}:version_events"

    def version_log(self, version: str) -> str:
        """List: one JSON line per event of this version (its rollout history; manifest.json stays immutable)."""
        return f"{self.prefix}:version_log:{version}"

    @property
    def align_refusals(self) -> str:
        """Hash: `<kind>:<record id>` (kind feedback|policy_pair) -> JSON of the gate refusals of runs that used
        that entry and were refused (count, and the runs' ids, times and failed checks); removed when a version
        consumes the entry or when it is dead-lettered (align/refusals.py)."""
        return f"{self.prefix}:align:refusals"

    @property
    def align_dead_letters(self) -> str:
        """Hash: `<kind>:<record id>` -> JSON of an entry taken out of training after `max_refusals` gate
        refusals (acknowledged, never read again; the refusals that put it there). Kept for the operator."""
        return f"{self.prefix}:align:dead_letters"

    align_group: str = "align"
    """Consumer group on the feedback and policy-pair streams that align reads with."""
