"""Settings both deployables share, read from the environment (prefix `SECONDSTAGE_`).

`CommonSettings` holds what serve and align must agree on (where Redis and the
var/ directory are, which base model is served); each deployable extends it with its
own class (`serve.settings.ServeSettings`, `align.settings.AlignSettings`). Retention
(`retention_days`, `stream_maxlen`) lives here because it bounds the data both sides share:
serve applies it when it writes, align must consume feedback before it expires.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SECONDSTAGE_", extra="ignore")

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
        "writes are refused (policy noeviction) and serve spools records to disk; nothing is evicted silently.",
    )
    retention_days: float = Field(
        default=30.0,
        gt=0,
        description="How long completions, feedback and policy pairs are kept: stream entries older than this are "
        "trimmed (XTRIM MINID, approximate) and each completion's lookup key expires after it (TTL).",
    )
    stream_maxlen: int = Field(
        default=1_000_000,
        ge=1,
        description="Most entries kept per record stream (completions, feedback, policy pairs): older ones are "
        "trimmed on append (XADD MAXLEN ~, so a stream may briefly hold a little more).",
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
