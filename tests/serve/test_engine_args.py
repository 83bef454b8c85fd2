"""vLLM's engine arguments from ServeSettings: what reaches AsyncEngineArgs, and the device-dependent defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.engine import engine_kwargs
from serve.settings import ServeSettings


def test_scale_out_settings_reach_the_engine_args(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SECONDSTAGE_MODEL": "org/big-model",
        "SECONDSTAGE_TENSOR_PARALLEL_SIZE": "4",
        "SECONDSTAGE_PIPELINE_PARALLEL_SIZE": "2",
        "SECONDSTAGE_DTYPE": "bfloat16",
        "SECONDSTAGE_MAX_MODEL_LEN": "8192",
        "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": "0.9",
        "SECONDSTAGE_MAX_LORAS": "4",
        "SECONDSTAGE_MAX_LORA_RANK": "64",
        "SECONDSTAGE_ENFORCE_EAGER": "true",
        "SECONDSTAGE_ENABLE_PREFIX_CACHING": "false",
        "SECONDSTAGE_DISTRIBUTED_EXECUTOR_BACKEND": "mp",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kwargs = engine_kwargs(ServeSettings(), cuda=True)
    assert kwargs["model"] == "org/big-model"
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["pipeline_parallel_size"] == 2
    assert kwargs["dtype"] == "bfloat16" and kwargs["max_model_len"] == 8192
    assert kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["max_loras"] == 4 and kwargs["max_lora_rank"] == 64 and kwargs["enable_lora"] is True
    assert kwargs["enforce_eager"] is True  # set explicitly: wins over the GPU default
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["distributed_executor_backend"] == "mp"


def test_enforce_eager_defaults_by_device() -> None:
    settings = ServeSettings(model="m")
    assert engine_kwargs(settings, cuda=False)["enforce_eager"] is True  # CPU: fast start, no graphs there
    assert engine_kwargs(settings, cuda=True)["enforce_eager"] is False  # GPU: CUDA graphs on
    assert engine_kwargs(ServeSettings(model="m", enforce_eager=False), cuda=False)["enforce_eager"] is False


def test_block_size_defaults_by_device() -> None:
    """CPU: 32, so the prefix cache can hold the policy instructions (vLLM's CPU default, 128, never fills a block
    with them); a GPU keeps vLLM's default; a set value wins on both."""
    settings = ServeSettings(model="m")
    assert engine_kwargs(settings, cuda=False)["block_size"] == 32
    assert "block_size" not in engine_kwargs(settings, cuda=True)
    assert engine_kwargs(ServeSettings(model="m", block_size=64), cuda=False)["block_size"] == 64
    assert engine_kwargs(ServeSettings(model="m", block_size=64), cuda=True)["block_size"] == 64


def test_unset_options_are_left_to_vllm() -> None:
    kwargs = engine_kwargs(ServeSettings(model="m"), cuda=False)
    assert "enable_prefix_caching" not in kwargs and "distributed_executor_backend" not in kwargs
    assert kwargs["tensor_parallel_size"] == 1 and kwargs["pipeline_parallel_size"] == 1


def test_bad_parallel_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        ServeSettings(tensor_parallel_size=0)
    with pytest.raises(ValidationError, match="distributed_executor_backend: `uni` runs one worker"):
        ServeSettings(tensor_parallel_size=2, distributed_executor_backend="uni")


def test_vllm_accepts_the_arguments() -> None:
    """The names and types are vLLM's: AsyncEngineArgs takes them (building it starts nothing)."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    settings = ServeSettings(model="m", tensor_parallel_size=2, enable_prefix_caching=True)
    args = arg_utils.AsyncEngineArgs(**engine_kwargs(settings, cuda=True))
    assert args.tensor_parallel_size == 2 and args.enable_prefix_caching is True and args.enforce_eager is False
