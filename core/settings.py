"""Settings both deployables share, read from the environment (prefix `SECONDSTAGE_`).

`CommonSettings` holds what serve and align must agree on (where Redis and the
var/ directory are, which base model is served); each deployable extends it with its
own class (`serve.settings.ServeSettings`, `align.settings.AlignSettings`).
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
    def model_path(self) -> str:
        """The base model to load: the configured one, else the demo model."""
        return self.model if self.model else str(self.demo_model_dir)
