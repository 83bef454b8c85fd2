"""Settings of the server, read from the environment (prefix `SECONDSTAGE_`).

Extends `core.settings.CommonSettings` (Redis, var/, base model) with what only serving needs.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.settings import CommonSettings

_REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


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
        default=2,
        description="LoRA versions resident in one batch: the incumbent and a canary (vLLM reloads a third, e.g. "
        "one still draining, from disk on demand).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs each layer is split across (vLLM tensor parallelism, within one node)."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="Pipeline stages the layers are split into (vLLM pipeline parallelism)."
    )
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        default=None,
        description="How vLLM runs its workers when parallel: `mp` (processes on this node), `ray` (across "
        "nodes, needs a Ray cluster), `uni` (one process). Unset: vLLM's choice (mp on one node).",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="Skip CUDA graph capture and compilation. Unset: on for CPU (a fast start; graphs do not "
        "apply there), off with a CUDA GPU (graphs make small batches much faster; the start takes longer).",
    )
    enable_prefix_caching: bool | None = Field(
        default=None,
        description="Reuse the KV cache of shared prompt prefixes (system prompts, the policy instructions). "
        "Unset: vLLM's default for the platform.",
    )
    block_size: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per KV-cache block (vLLM's `block_size`). The prefix cache reuses whole blocks only, so a "
        "shared prefix shorter than a block is computed again for every request. Unset: 32 on CPU (vLLM's CPU "
        "default is 128, and its attention needs a multiple of 32: at 128 the policy instructions every request "
        "starts with, ~95 tokens on the demo model, never fill a block and are prefilled each time; at 32, 96 of "
        "them come from the cache — docs/performance.md, 'Equal prompts and the KV block size'), vLLM's default "
        "with a CUDA GPU (16).",
    )
    keep_off_worker_cpus: bool = Field(
        default=False,
        description="On a CPU engine, once it has started, move this server's own processes (the API, vLLM's "
        "engine core, the private redis-server) onto the cores vLLM left its workers off, so they never preempt "
        "a forward pass (serve/placement.py; 9-19% more throughput at 64 streams on 2 cores). Does nothing on "
        "a GPU or when the workers are not bound (`VLLM_CPU_OMP_THREADS_BIND=nobind`). Off by default: with it "
        "on, the full test suite saw an external redis-server stall for over 5 s during merged-weights swaps, "
        "twice, and the cause is not yet known (docs/performance.md).",
    )
    merged_weights: bool = Field(
        default=False,
        description="Serve the promoted version merged into full weights (as fast as the base model; a LoRA "
        "adapter on every request costs about half the throughput on CPU) instead of as a LoRA adapter. A swap "
        "or rollback then drains running requests and reloads the weights (pause, reload, prefix-cache reset, "
        "resume: 0.05-0.3 s on the demo model, longer for a larger one, which is read in full; an adapter swap "
        "takes milliseconds); each version's merged copy takes the base model's size on disk "
        "(versions/<v>/merged/), no extra GPU memory. A canary stays a LoRA, as its delta from the incumbent: a "
        "LoRA of both adapters' ranks added, which max_lora_rank must hold (align's default 8 + 8 = 16, the default).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per log line (request id, version, route, status, latency on "
        "access lines) for log shippers; `text`: human-readable lines.",
    )
    max_body_bytes: int = Field(default=1_000_000, description="Largest request body accepted (413 above).")
    max_completion_choices: int = Field(
        default=256,
        ge=1,
        description="/v1/completions: most prompts × n in one request (400 above; each is an engine request).",
    )
    policies_enabled: bool = Field(default=True, description="Enforce the rule files in policies_dir.")
    logging_enabled: bool = Field(default=True, description="Log completions to Redis.")
    log_queue_size: int = Field(default=10_000, description="Records held in memory before spooling to disk.")
    log_linger_s: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="How long the log writer lets a batch that is not full wait for more records before writing "
        "it to Redis: fewer round trips (CPU of serve and redis-server per completion), records reach Redis that "
        "much later.",
    )
    spool_max_mb: float = Field(
        default=1024.0,
        gt=0,
        description="Largest disk spool (MiB) while Redis is away; past it new records are dropped, logged and "
        "counted in secondstage_log_records_dropped_total.",
    )
    store_raw_output: bool = Field(
        default=False,
        description="Store the model's unfiltered text (`raw_text`, a policy pair's `rejected` side) in clear. Off: "
        "what output rules redacted or blocked is never stored; pairs mask it (see docs/security.md).",
    )
    redis_restart_delay_s: float = Field(
        default=0.25, description="Private Redis: wait before restarting it; doubles per restart in a row."
    )
    redis_restart_max_delay_s: float = Field(
        default=30.0,
        description="Private Redis: the longest wait between restarts (also the retry period once failed).",
    )
    anonymous_rpm: int | None = Field(
        default=None,
        ge=1,
        description="Requests per minute for callers without an API key (the open local mode), summed over "
        "every replica on the same Redis. Unset: no limit. Keys carry their own limits.",
    )
    anonymous_tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute (prompt + n × max_tokens, charged before the engine) for callers "
        "without an API key. Unset: no limit.",
    )
    anonymous_feedback_per_min: int | None = Field(
        default=None, ge=1, description="Feedback events per minute for callers without an API key. Unset: no limit."
    )
    anonymous_max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Chat and completion requests in flight at once for callers without an API key. Unset: no limit.",
    )
    rate_limit_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Concurrency leases expire this long after their replica last renewed them (so a crashed "
        "replica's in-flight requests stop counting); live replicas renew every third of it.",
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve chat and feedback without a key on a non-loopback bind while no key exists "
        "(a loopback bind does so anyway). Admin routes always need an admin key.",
    )
    admin_key_file: Path | None = Field(
        default=None, description="The local admin key serve generates on first start. Default: var/admin.key."
    )
    admin_port: int | None = Field(
        default=None,
        description="Serve /admin/* and /metrics only on this port (404 on the public one). Unset: one port for all.",
    )
    admin_host: str | None = Field(default=None, description="Address the admin port binds. Default: `host`.")
    auth_cache_s: float = Field(
        default=2.0,
        description="How long a replica trusts an API key lookup; a revoke takes effect within this on every replica.",
    )
    reconcile_interval_s: float = Field(default=5.0, description="How often to re-read the active version from Redis.")
    version_retry_max_s: float = Field(
        default=60.0,
        gt=0,
        description="A version that failed to load is retried after 1s, doubling per failure up to this; "
        "meanwhile /health, /v1/models and secondstage_version_skew report the skew.",
    )
    canary_min_requests: int = Field(
        default=200,
        ge=1,
        description="A canary is judged only once it and the incumbent each served this many requests.",
    )
    canary_min_duration_s: float = Field(
        default=1800.0, ge=0, description="A canary is judged only once it has run this long (seconds)."
    )
    canary_eval_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often each replica judges the running canary (the first decision written wins).",
    )
    canary_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Significance of the one-sided tests that roll a canary back (Bonferroni-split over the tests).",
    )
    canary_max_ttft_ratio: float = Field(
        default=1.5,
        gt=1,
        description="Roll back a canary whose mean time to first token exceeds the incumbent's times this.",
    )
    canary_min_ratings: int = Field(
        default=20, ge=2, description="Ratings each version needs before the mean rating is compared."
    )
    canary_early_alpha: float = Field(
        default=0.001,
        ge=0,
        lt=1,
        description="Before the minimums, roll back a canary whose error, policy-violation or negative-feedback "
        "rate is worse than the incumbent's at this level (one-sided Fisher, each test; far stricter than "
        "canary_alpha because the judge looks again every interval). 0 turns the early rollback off.",
    )
    canary_early_min_requests: int = Field(
        default=20, ge=1, description="Requests each version needs before the early rollback may judge."
    )
    replica_name: str = Field(
        default_factory=socket.gethostname,
        description="This replica's name: its log spool is var/spool/<name>/. Default: the hostname (in "
        "Kubernetes the pod name; a StatefulSet keeps it across restarts, so a replacement replays the spool).",
    )
    feedback_unverified_window_s: float = Field(
        default=600.0,
        ge=0,
        description="Feedback on a completion id not (yet) in Redis is accepted unverified when the id was made "
        "less than this long ago (another replica may not have written it yet); older unknown ids are a 404. 0: never.",
    )
    seed: int = Field(default=0, description="Engine seed.")
    dtype: str = Field(
        default="auto",
        description="Weights dtype for vLLM. `auto` means the model's own, except float32 for the demo model "
        "(vLLM's CPU default, bfloat16, makes LoRA outputs drift from what training measured).",
    )

    @field_validator("replica_name")
    @classmethod
    def _replica_name_is_a_directory_name(cls, value: str) -> str:
        if not _REPLICA_NAME.fullmatch(value):
            raise ValueError(
                f"replica_name: {value!r} must be 1-253 letters, digits, `.`, `_` or `-`, starting with a letter or "
                "digit (it names the replica's spool directory); set SECONDSTAGE_REPLICA_NAME, e.g. to the pod name"
            )
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServeSettings:
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError(
                f"admin_port: must differ from port (both {self.port}); unset it to serve everything on one port"
            )
        return self

    @model_validator(mode="after")
    def _parallel_fits(self) -> ServeSettings:
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(
                f"distributed_executor_backend: `uni` runs one worker, but tensor_parallel_size × "
                f"pipeline_parallel_size is {self.tensor_parallel_size * self.pipeline_parallel_size}; "
                "use `mp` (one node) or `ray` (several), or unset it"
            )
        return self

    @property
    def spool_dir(self) -> Path:
        """This replica's log spool: var/spool/<replica_name>/ (one LogWriter per directory)."""
        return self.var_dir / "spool" / self.replica_name

    @property
    def admin_key_path(self) -> Path:
        return self.admin_key_file or self.var_dir / "admin.key"

    @property
    def engine_dtype(self) -> str:
        is_demo = (Path(self.model_path) / "secondstage_demo.json").is_file()
        return "float32" if self.dtype == "auto" and is_demo else self.dtype

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path.rstrip("/")).name
