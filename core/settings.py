"""Settings both deployables share, read from the environment (prefix `SECONDSTAGE_`).

`CommonSettings` holds what serve and align must agree on (where Redis and the
var/ directory are, which base model is served); each deployable extends it with its
own class (`serve.settings.ServeSettings`, `align.settings.AlignSettings`). Retention
(`retention_days`, `stream_maxlen`) lives here because it bounds the data both sides share:
serve applies it when it writes, align must consume feedback before it expires.

`check_environment` reports `SECONDSTAGE_*` variables that no settings class reads: pydantic-settings
ignores them (`extra="ignore"`, because serve and align share the prefix and often one environment), so a
typo such as `SECONDSTAGE_MAX_MODEL_LENGTH` would otherwise change nothing, silently.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SECONDSTAGE_"

KNOWN_EXTRA_ENV: dict[str, str] = {
    "SECONDSTAGE_REDIS_PASSWORD": "read by the deploy/ manifests to build SECONDSTAGE_REDIS_URL, not by Python",
}
"""Variables with the prefix that no settings class reads but that are meant (name → who reads it)."""

logger = logging.getLogger("secondstage.settings")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    var_dir: Path = Field(default=Path("var"), description="Runtime data: models, versions, Redis data, spool.")
    model: str | None = Field(
        default=None, description="Base model: a Hugging Face model directory or hub id. Default: the demo model."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to use (redis://, rediss://, unix://). Unset: a private redis-server under var/redis.",
    )
    redis_wait_s: float = Field(
        default=30.0,
        description="How long a command waits for the private Redis while serve restarts it, before giving up.",
    )
    redis_prefix: str = Field(default="secondstage", description="Prefix of every Redis key this deployment uses.")
    redis_maxmemory: str = Field(
        default="1gb",
        description="Memory cap of the private Redis (redis-server's `maxmemory`, e.g. 512mb, 2gb). Past it, "
        "writes are refused (policy noeviction) and serve spools records to disk; nothing is evicted silently. "
        "Size it from bench/logwriter: a completion costs ~3.6 KB (stream entry + lookup key), so 1gb holds "
        "~280k completions; keep stream_maxlen × 3.6 KB under it.",
    )
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="How long completions, feedback and policy pairs are kept: stream entries older than this are "
        "trimmed (XTRIM MINID, approximate) and each completion's lookup key expires after it (TTL).",
    )
    stream_maxlen: int = Field(
        default=250_000,
        ge=1,
        description="Most entries kept per record stream (completions, feedback, policy pairs): older ones are "
        "trimmed on append (XADD MAXLEN ~, so a stream may briefly hold a little more). The default fits the "
        "private Redis' default 1gb maxmemory (~3.6 KB per completion, measured by bench/logwriter); raise both "
        "together (e.g. 1,000,000 with 4gb).",
    )
    policies_dir: Path = Field(
        default=Path("policies"),
        description="Directory of policy rule files: serve enforces them on requests and responses; align checks "
        "every correction against them again before it becomes a training answer (a missing directory fails "
        "the run; an empty one applies no rules), and its gate applies their input stage to its prompts and their "
        "output stage to its samples.",
    )

    canary_enabled: bool = Field(
        default=True,
        description="A version align publishes first serves a share of callers as a canary, promoted or rolled "
        "back on live signals (docs/architecture.md, Canary). Off: it is activated for everyone at once.",
    )
    canary_share: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of caller identities (API key + `user`) a new canary serves; sticky per identity.",
    )

    strict_env: bool = Field(
        default=False,
        description="Refuse to start when a SECONDSTAGE_* variable is not a known setting (default: warn only).",
    )

    @property
    def demo_model_dir(self) -> Path:
        return self.var_dir / "models" / "demo"

    @property
    def versions_dir(self) -> Path:
        return self.var_dir / "models" / "versions"

    @property
    def redis_dir(self) -> Path:
        return self.var_dir / "redis"

    @property
    def retention_s(self) -> int:
        return int(self.retention_days * 86400)

    @property
    def model_path(self) -> str:
        """The base model to load: the configured one, else the demo model."""
        return self.model if self.model else str(self.demo_model_dir)


class UnknownSettingError(ValueError):
    """A SECONDSTAGE_* variable names no setting while strict_env is on; the message names it and the fix."""


@dataclass(frozen=True)
class UnknownVariable:
    name: str
    closest: str | None

    def describe(self) -> str:
        hint = f"did you mean {self.closest}?" if self.closest else "no setting has a similar name"
        return f"{self.name} is not a secondstage setting and is ignored; {hint}"


def _settings_classes(roots: Iterable[type[BaseSettings]]) -> set[type[BaseSettings]]:
    """`roots` and every subclass of them imported so far (the root CLI imports each installed side's)."""
    found: set[type[BaseSettings]] = set()
    todo = list(roots)
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def known_env_names(classes: Iterable[type[BaseSettings]] = (CommonSettings,)) -> set[str]:
    """Every SECONDSTAGE_* name the given settings classes (and their loaded subclasses) read, plus the extras."""
    names = set(KNOWN_EXTRA_ENV)
    for cls in _settings_classes(classes):
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        names.update(prefix + field.upper() for field in cls.model_fields)
    return names


def unknown_env(
    classes: Iterable[type[BaseSettings]] = (CommonSettings,), environ: Mapping[str, str] | None = None
) -> list[UnknownVariable]:
    """The SECONDSTAGE_* variables in `environ` (default: the process's) that no known setting reads."""
    environ = os.environ if environ is None else environ
    known = sorted(known_env_names(classes))
    unknown = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if upper.startswith(ENV_PREFIX) and upper not in known:
            closest = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            unknown.append(UnknownVariable(name, closest[0] if closest else None))
    return unknown


def check_environment(
    classes: Iterable[type[BaseSettings]] = (CommonSettings,),
    *,
    strict: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[UnknownVariable]:
    """Warn about each unknown SECONDSTAGE_* variable; raise `UnknownSettingError` instead when strict.

    Pass the settings classes of the deployable that starts (the subclasses of `CommonSettings` already imported
    count too, so the root CLI knows serve's and align's names at once). `strict` None reads SECONDSTAGE_STRICT_ENV.
    """
    environ = os.environ if environ is None else environ
    found = unknown_env(classes, environ)
    if strict is None:
        strict = _truthy(environ)
    if found and strict:
        raise UnknownSettingError(
            "; ".join(v.describe() for v in found) + " Fix or remove the variable, or unset SECONDSTAGE_STRICT_ENV "
            "(or drop --strict-env) to only warn"
        )
    for variable in found:
        logger.warning("%s", variable.describe())
    return found


def _truthy(environ: Mapping[str, str]) -> bool:
    # Read directly, not through CommonSettings: this check runs before (and apart from) the settings' validation.
    value = next((v for k, v in environ.items() if k.upper() == ENV_PREFIX + "STRICT_ENV"), "false")
    return value.strip().lower() in ("1", "true", "yes", "on")
