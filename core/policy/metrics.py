"""The policy engine's Prometheus metrics: decisions by rule, reload attempts, the active rule set."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass
class PolicyMetrics:
    decisions: Counter
    reloads: Counter
    info: Gauge
    versions: set[str] = field(default_factory=set)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> PolicyMetrics:
        return cls(
            decisions=Counter(
                "secondstage_policy_decisions",
                "Policy decisions, by rule, action, mode and stage.",
                ["rule", "action", "mode", "stage"],
                registry=registry,
            ),
            reloads=Counter(
                "secondstage_policy_reloads",
                "Policy reload attempts, by result (ok|error).",
                ["result"],
                registry=registry,
            ),
            info=Gauge(
                "secondstage_policy_ruleset_info",
                "The active policy rule set (value 1).",
                ["version"],
                registry=registry,
            ),
        )

    def set_version(self, version: str) -> None:
        for old in self.versions - {version}:
            self.info.remove(old)
        self.versions = {version}
        self.info.labels(version=version).set(1)
