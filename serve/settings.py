"""Settings of the server, read from the environment (prefix `SECONDSTAGE_`).

Extends `core.settings.CommonSettings` (Redis, var/, base model) with what only serving needs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from core.settings import CommonSettings


class ServeSettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=8000, description="Port to bind.")
    served_model_name: str | None = Field(
        default=None, description="Model name clients send and /v1/models lists. Default: the model directory's name."
    )
    max_model_len: int = Field(default=1024, description="Context length (prompt + completion tokens).")
    kv_cache_memory_fraction: float = Field(
        default=0.2, description="vLLM gpu_memory_utilization; on CPU the share of host RAM reserved for KV cache."
    )
    max_num_seqs: int = Field(default=64, description="Most sequences the engine runs at once.")
    max_lora_rank: int = Field(default=16, description="Largest LoRA rank an adapter version may have.")
    max_loras: int = Field(
        default=2, description="LoRA versions resident in one batch (active + the one being drained)."
    )
    max_body_bytes: int = Field(default=1_000_000, description="Largest request body accepted (413 above).")
    max_completion_choices: int = Field(
        default=256,
        ge=1,
        description="/v1/completions: most prompts × n in one request (400 above; each is an engine request).",
    )
    policies_dir: Path = Field(default=Path("policies"), description="Directory of policy rule files.")
    policies_enabled: bool = Field(default=True, description="Enforce the rule files in policies_dir.")
    logging_enabled: bool = Field(default=True, description="Log completions to Redis.")
    log_queue_size: int = Field(default=10_000, description="Records held in memory before spooling to disk.")
    redis_restart_delay_s: float = Field(
        default=0.25, description="Private Redis: wait before restarting it; doubles per restart in a row."
    )
    redis_restart_max_delay_s: float = Field(
        default=30.0,
        description="Private Redis: the longest wait between restarts (also the retry period once failed).",
    )
    reconcile_interval_s: float = Field(default=5.0, description="How often to re-read the active version from Redis.")
    enforce_eager: bool = Field(default=True, description="Skip vLLM graph compilation (fast start on CPU).")
    seed: int = Field(default=0, description="Engine seed.")
    dtype: str = Field(
        default="auto",
        description="Weights dtype for vLLM. `auto` means the model's own, except float32 for the demo model "
        "(vLLM's CPU default, bfloat16, makes LoRA outputs drift from what training measured).",
    )

    @property
    def engine_dtype(self) -> str:
        is_demo = (Path(self.model_path) / "secondstage_demo.json").is_file()
        return "float32" if self.dtype == "auto" and is_demo else self.dtype

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path.rstrip("/")).name
