"""The model engine: vLLM's AsyncLLM in-process, plus which model version each request uses.

A version is either the base model or a LoRA adapter from the version store.
Two can serve at once: the incumbent (`current`) and, while a canary runs
(core/canary.py), the canary for a sticky share of caller identities (`route`).
`pin()` binds a request to the version routed to when it starts, so a swap never
mixes two versions in one response; versions no request uses any more are
unloaded from the engine (vLLM does not free them by itself: vllm #54839).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from core.canary import assign
from core.versions import BASE, VersionError, VersionStore, check_name, version_number
from serve.errors import BadRequest, NotFound
from serve.logs import note_version

if TYPE_CHECKING:
    from serve.metrics import Metrics
    from serve.settings import ServeSettings

logger = logging.getLogger("secondstage.engine")


def engine_kwargs(settings: ServeSettings, *, cuda: bool) -> dict[str, Any]:
    """vLLM's `AsyncEngineArgs` for these settings; `cuda` says whether a CUDA (or ROCm) GPU runs the model.

    Settings left unset (None) are left out, so vLLM applies its own default for the platform; the exception
    is enforce_eager, whose default here depends on the device (see `ServeSettings.enforce_eager`).
    """
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "served_model_name": [settings.model_name],
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.kv_cache_memory_fraction,
        "max_num_seqs": settings.max_num_seqs,
        "enable_lora": True,
        "max_lora_rank": settings.max_lora_rank,
        "max_loras": settings.max_loras,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "enforce_eager": (not cuda) if settings.enforce_eager is None else settings.enforce_eager,
        "seed": settings.seed,
        "dtype": settings.engine_dtype,
        "disable_log_stats": False,
    }
    if settings.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = settings.enable_prefix_caching
    if settings.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = settings.distributed_executor_backend
    return kwargs


class LLM(Protocol):
    """The slice of vLLM's AsyncLLM we use (a fake implements it in unit tests)."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kw: Any) -> AsyncIterator[Any]: ...
    async def abort(self, request_id: str | list[str]) -> None: ...
    async def add_lora(self, lora_request: Any) -> bool: ...
    async def remove_lora(self, lora_id: int) -> bool: ...
    async def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


@dataclass
class ServedVersion:
    name: str
    lora: Any | None  # vllm LoRARequest, None for the base model
    inflight: int = 0


@dataclass(frozen=True)
class CanaryRoute:
    """The canary this replica routes to: which callers (`share`, salted by `run`) get `version`."""

    version: ServedVersion
    share: float
    run: str
    since: float
    incumbent: str
    """The incumbent when the canary started (the role its requests are counted under)."""


class ModelEngine:
    def __init__(
        self,
        llm: LLM,
        tokenizer: Any,
        *,
        model_name: str,
        max_model_len: int,
        store: VersionStore,
        metrics: Metrics | None = None,
        lora_request_cls: Any = None,
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.store = store
        self.metrics = metrics
        self._lora_request_cls = lora_request_cls
        self.current = ServedVersion(BASE, None)
        """The incumbent: the promoted version, served to every caller outside a canary's share."""
        self.canary: CanaryRoute | None = None
        self._loaded: dict[str, ServedVersion] = {}
        self._swap_lock = asyncio.Lock()
        if metrics:
            metrics.set_active_version(BASE)

    @classmethod
    def from_settings(cls, settings: ServeSettings, metrics: Metrics | None = None) -> ModelEngine:
        """Start vLLM's engine on the configured base model (15-20 s on CPU)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(settings, cuda=current_platform.is_cuda_alike())
        logger.info("vLLM engine arguments: %s", kwargs)
        args = AsyncEngineArgs(**kwargs)
        llm = AsyncLLM.from_engine_args(args)
        return cls(
            llm,  # type: ignore[arg-type]  # AsyncLLM satisfies LLM; its generate() is just more specific
            llm.get_tokenizer(),
            model_name=settings.model_name,
            max_model_len=settings.max_model_len,
            store=VersionStore(settings.versions_dir),
            metrics=metrics,
            lora_request_cls=LoRARequest,
        )

    # -- prompts -------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant's turn."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises on conversations the template refuses (e.g. bad role order)
            raise BadRequest(f"messages: the model's chat template rejected them: {exc}", param="messages") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_length(self, prompt_len: int, max_tokens: int | None, param: str = "messages") -> int:
        """The max new tokens to use; 400 when the prompt (plus requested tokens) exceeds the context."""
        room = self.max_model_len - prompt_len
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = prompt_len + (max_tokens or 1)
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked} tokens ({prompt_len} in the {param}, {max_tokens or 1} for the completion). "
                f"Please reduce the length of the {param} or the completion.",
                param=param,
            )
        return max_tokens if max_tokens is not None else room

    # -- generation ----------------------------------------------------------------------------

    def route(self, identity: str | None = None) -> ServedVersion:
        """The version a new request from `identity` gets: the canary for its share of identities, else the
        incumbent (sticky: `core.canary.assign` hashes the run and the identity, the same on every replica)."""
        canary = self.canary
        if canary is not None and identity is not None and assign(canary.run, canary.share, identity):
            return canary.version
        return self.current

    def role_of(self, version: ServedVersion) -> tuple[str, str] | None:
        """(canary run, role) a request on `version` counts under while a canary runs; None otherwise."""
        canary = self.canary
        if canary is None:
            return None
        if version is canary.version:
            return canary.run, "canary"
        if version is self.current and version.name == canary.incumbent:
            return canary.run, "incumbent"
        return None

    def _resident(self, version: ServedVersion) -> bool:
        return version is self.current or (self.canary is not None and version is self.canary.version)

    @contextlib.contextmanager
    def pin(self, identity: str | None = None) -> Iterator[ServedVersion]:
        """Bind one request to the version routed to now (`route`); it keeps it to the end, whatever swaps happen."""
        version = self.route(identity)
        version.inflight += 1
        note_version(version.name)  # the request's log lines name the version that served it
        try:
            yield version
        finally:
            version.inflight -= 1
            if not self._resident(version) and version.inflight == 0 and version.lora is not None:
                # The last request on a superseded version is done: free its adapter.
                task = asyncio.get_running_loop().create_task(self._unload(version))
                task.add_done_callback(lambda t: t.exception())

    async def generate(
        self, prompt_ids: list[int], params: Any, request_id: str, version: ServedVersion, priority: int = 0
    ) -> AsyncGenerator[Any, None]:
        """Stream vLLM RequestOutputs; closing the iterator aborts the engine request."""
        stream = self.llm.generate(
            {"prompt_token_ids": prompt_ids}, params, request_id, lora_request=version.lora, priority=priority
        )
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.llm.abort(request_id)

    # -- versions ------------------------------------------------------------------------------

    def reject_version(self, name: str, reason: str) -> None:
        """Log and count (`secondstage_swaps_total{result="rejected"}`) a version refused before loading it."""
        logger.error("refusing to activate version %r: %s; still serving %s", name[:80], reason, self.current.name)
        if self.metrics:
            self.metrics.swaps.labels("rejected").inc()

    async def activate(self, name: str) -> float:
        """Load `name` (if an adapter) and route new requests to it. Returns seconds taken.

        The name may come from Redis: one that is not `base` or v<number>, or whose directory resolves
        outside the versions root, is refused (BadRequest, counted as rejected) and nothing changes.
        """
        if name != BASE:
            try:
                self.store.path(check_name(name))
            except VersionError as exc:
                self.reject_version(name, str(exc))
                raise BadRequest(str(exc), param="version") from exc
        async with self._swap_lock:
            if name == self.current.name:
                return 0.0
            start = time.perf_counter()
            try:
                served = await self._load(name)
            except Exception:
                if self.metrics:
                    self.metrics.swaps.labels("error").inc()
                raise
            previous, self.current = self.current, served
            if self.canary is not None and self.canary.version.name == name:
                # Promotion: the canary is the incumbent now, in the same step (no request sees neither).
                self.canary = None
                self._canary_metrics()
            took = time.perf_counter() - start
            logger.info("now serving version %s (was %s; loaded in %.3fs)", name, previous.name, took)
            if self.metrics:
                self.metrics.swaps.labels("ok").inc()
                self.metrics.swap_duration.observe(took)
                self.metrics.set_active_version(name)
            if previous.inflight == 0 and previous.lora is not None:
                await self._unload(previous)
            return took

    async def set_canary(self, name: str | None, *, share: float = 0.0, run: str = "", since: float = 0.0) -> None:
        """Route `share` of identities to version `name` (loaded first), or stop routing to a canary (None).

        Requests already running keep their version to the end; a canary's adapter is freed once it
        neither serves new requests nor has any running.
        """
        if name is not None and name != BASE:
            try:
                self.store.path(check_name(name))
            except VersionError as exc:
                self.reject_version(name, str(exc))
                raise BadRequest(str(exc), param="version") from exc
        async with self._swap_lock:
            old = self.canary
            if name is None:
                self.canary = None
            elif old is None or old.version.name != name or old.run != run or old.share != share:
                try:
                    served = ServedVersion(BASE, None) if name == BASE else await self._load(name)
                except Exception:
                    if self.metrics:
                        self.metrics.swaps.labels("error").inc()
                    raise
                self.canary = CanaryRoute(served, share, run, since, self.current.name)
                logger.info("canary %s serves %.0f%% of callers (run %s; incumbent %s)", name, share * 100, run,
                            self.current.name)  # fmt: skip
            self._canary_metrics()
            if old is not None and self.canary is None:
                logger.info("canary %s ended; %s serves everyone", old.version.name, self.current.name)
            if old is not None and old.version.lora is not None and not self._resident(old.version):
                await self._unload(old.version)  # a no-op while requests run on it: the last one frees it (`pin`)

    def _canary_metrics(self) -> None:
        if self.metrics:
            c = self.canary
            self.metrics.set_canary(c.version.name if c else None, c.share if c else 0.0)

    async def _load(self, name: str) -> ServedVersion:
        if name == BASE:
            return ServedVersion(BASE, None)
        if name in self._loaded:
            return self._loaded[name]
        try:
            manifest = self.store.manifest(name)
        except VersionError as exc:
            raise NotFound(str(exc), param="version") from exc
        adapter = self.store.adapter_path(manifest.version)
        lora = self._lora_request_cls(lora_name=name, lora_int_id=max(1, version_number(name)), lora_path=str(adapter))
        # add_lora loads the weights now, so the first request on the new version pays nothing.
        if not await self.llm.add_lora(lora):
            raise RuntimeError(f"the engine refused adapter {adapter}")
        served = ServedVersion(name, lora)
        self._loaded[name] = served
        if self.metrics:
            self.metrics.loaded_adapters.set(len(self._loaded))
        return served

    async def _unload(self, version: ServedVersion) -> None:
        if self._resident(version) or version.inflight or self._loaded.get(version.name) is not version:
            return
        del self._loaded[version.name]
        with contextlib.suppress(Exception):
            await self.llm.remove_lora(version.lora.lora_int_id)  # type: ignore[union-attr]
        if self.metrics:
            self.metrics.loaded_adapters.set(len(self._loaded))
        logger.info("unloaded version %s", version.name)

    def loaded_versions(self) -> list[str]:
        return list(self._loaded)

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
