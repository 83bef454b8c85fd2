"""The model engine: vLLM's AsyncLLM in-process, plus which model version each request uses.

A version is either the base model or a LoRA adapter from the version store.
Two can serve at once: the incumbent (`current`) and, while a canary runs
(core/canary.py), the canary for a sticky share of caller identities (`route`).
`pin()` binds a request to the version routed to when it starts, so a swap never
mixes two versions in one response; versions no request uses any more are
unloaded from the engine (vLLM does not free them by itself: vllm #54839).

Merged-weights mode (`weights` given; SECONDSTAGE_MERGED_WEIGHTS) serves the incumbent as the engine's own
weights, with no LoRA on its requests (as fast as the base model), and swaps it by reloading them:

1. the new version's merged weights are prepared (serve/weights.py; merged when missing) while the old
   ones go on serving; a failure here changes nothing;
2. new requests are routed to the new version at once and wait in `generate` for its weights;
3. requests already on the old weights are drained: each is waited for until the engine has it (its first
   output), then `pause_generation(mode="wait")` lets the engine finish them and holds everything else;
4. `reload_weights` reads the new directory in place, the prefix cache is reset (KV blocks computed with
   the old weights must not be reused), generation resumes and the waiting requests start.

So a response never mixes two weight versions and always names the one that made it. A reload that fails
restores the old weights (reloaded from their directory) and the swap fails like a failed adapter load
(serve/swap.py: skew, backoff); requests that waited for the new version get a retryable 503. Only when the
old weights cannot be restored either does the engine report itself unhealthy.

A canary stays on the LoRA path, as a delta from the incumbent's merged weights (core/merge.py: align's
adapters are deltas from the base, so the canary's own adapter would count the incumbent's update twice).
Its adapter is tied to the weights it was built against: a swap ends the canary (a promotion or an
activation ends it in Redis too), and the canary's version is merged ahead so its promotion only reloads.
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
from core.merge import MergeError
from core.versions import BASE, VersionError, VersionStore, check_name, version_number
from serve.errors import BadRequest, NotFound, Unavailable
from serve.logs import note_version
from serve.prefix_tokens import PrefixTokens

if TYPE_CHECKING:
    from serve.metrics import Metrics
    from serve.settings import ServeSettings
    from serve.weights import MergedWeights

logger = logging.getLogger("secondstage.engine")

_DELTA_LORA_ID = 1_000_000
"""Delta adapters get vLLM LoRA ids from here up (a version's own adapter uses its number)."""


CPU_BLOCK_SIZE = 32
"""KV-cache block size on CPU when `block_size` is unset: the smallest vLLM's CPU attention takes, so the prefix
cache can reuse a shared prefix as short as the policy instructions (ServeSettings.block_size says why)."""


def engine_kwargs(settings: ServeSettings, *, cuda: bool) -> dict[str, Any]:
    """vLLM's `AsyncEngineArgs` for these settings; `cuda` says whether a CUDA (or ROCm) GPU runs the model.

    Settings left unset (None) are left out, so vLLM applies its own default for the platform; the exception
    are enforce_eager and block_size, whose defaults here depend on the device (see `ServeSettings`).
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
    block_size = settings.block_size if settings.block_size is not None else (None if cuda else CPU_BLOCK_SIZE)
    if block_size is not None:
        kwargs["block_size"] = block_size
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


class WeightsLLM(LLM, Protocol):
    """What merged-weights mode needs beyond `LLM`: pause, in-place reload, prefix-cache reset, resume."""

    async def pause_generation(self, *, mode: Any = ..., clear_cache: bool = ...) -> None: ...
    async def resume_generation(self) -> None: ...
    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any: ...
    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool: ...


@dataclass
class ServedVersion:
    name: str
    lora: Any | None  # vllm LoRARequest, None for the base model (or, in merged mode, the merged incumbent)
    inflight: int = 0
    weights: str | None = None
    """Merged mode: the version whose merged weights the engine must hold for this one (None: LoRA mode)."""
    key: str = ""
    """Its entry among the loaded adapters (the name; in merged mode the name @ the weights it is a delta from)."""

    def __post_init__(self) -> None:
        self.key = self.key or self.name


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
        weights: MergedWeights | None = None,
        max_lora_rank: int = 16,
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self._prompt_tokens = PrefixTokens(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.store = store
        self.metrics = metrics
        self._lora_request_cls = lora_request_cls
        self.max_lora_rank = max_lora_rank
        self.weights_source = weights
        """Merged-weights mode when set: where merged weights and delta adapters come from."""
        self.weights = BASE
        """Merged mode: the version whose weights the engine holds (`base`: the base model's own)."""
        self.current = ServedVersion(BASE, None, weights=BASE if weights is not None else None)
        """The incumbent: the promoted version, served to every caller outside a canary's share."""
        self.canary: CanaryRoute | None = None
        self._loaded: dict[str, ServedVersion] = {}
        self._swap_lock = asyncio.Lock()
        # Merged mode: the weights a swap moves to, whether the engine is reloading, requests per weights that
        # the engine has not taken yet, an event set (and replaced) whenever any of these change, and why the
        # engine holds no usable weights (a reload and the restore after it both failed).
        self._target: str | None = None
        self._reloading = False
        self._waiting_engine: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._broken: str | None = None
        self._next_delta_id = _DELTA_LORA_ID
        if metrics:
            metrics.set_active_version(BASE)

    @classmethod
    def from_settings(cls, settings: ServeSettings, metrics: Metrics | None = None) -> ModelEngine:
        """Start vLLM's engine on the configured base model (15-20 s on CPU)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from serve.weights import MergedWeights

        kwargs = engine_kwargs(settings, cuda=current_platform.is_cuda_alike())
        logger.info("vLLM engine arguments: %s", kwargs)
        args = AsyncEngineArgs(**kwargs)
        llm = AsyncLLM.from_engine_args(args)
        store = VersionStore(settings.versions_dir)
        return cls(
            llm,  # type: ignore[arg-type]  # AsyncLLM satisfies LLM; its generate() is just more specific
            llm.get_tokenizer(),
            model_name=settings.model_name,
            max_model_len=settings.max_model_len,
            store=store,
            metrics=metrics,
            lora_request_cls=LoRARequest,
            weights=MergedWeights(store, settings.model_path) if settings.merged_weights else None,
            max_lora_rank=kwargs["max_lora_rank"],
        )

    # -- prompts -------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant's turn."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises on conversations the template refuses (e.g. bad role order)
            raise BadRequest(f"messages: the model's chat template rejected them: {exc}", param="messages") from exc
        return self._prompt_tokens.encode(text, messages)

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
        """Stream vLLM RequestOutputs; closing the iterator aborts the engine request.

        Merged mode: the request first waits until the engine holds its version's weights, and counts as
        waiting for the engine until its first output (from then on the engine has it, and a swap's
        `pause_generation(mode="wait")` lets it finish: a slow reader never holds a swap up). A JSON request
        (`FINAL_ONLY`) has one output, its last: a swap's drain waits for it to finish, which the pause would too.
        """
        waiting = version.weights
        if waiting is not None:
            await self._enter_weights(version)
        try:
            # A rendered `TokensInput` (what vLLM's own server passes): a bare `{"prompt_token_ids": ...}` is
            # re-rendered through vLLM's renderer in a thread pool, 10-13% of a one-token request's API-process
            # CPU for nothing (py-spy, docs/performance.md); the token ids are still validated by the engine.
            from vllm.inputs import tokens_input

            stream = self.llm.generate(
                tokens_input(prompt_ids), params, request_id, lora_request=version.lora, priority=priority
            )
            finished = False
            try:
                async for out in stream:
                    finished = out.finished
                    if waiting is not None:
                        self._engine_took(waiting)
                        waiting = None
                    yield out
            finally:
                if not finished:
                    await self.llm.abort(request_id)
        finally:
            if waiting is not None:
                self._engine_took(waiting)

    # -- merged weights: requests and the weights they need ------------------------------------------------------

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _enter_weights(self, version: ServedVersion) -> None:
        """Wait until the engine holds `version`'s weights (a swap to them is under way), then count the request."""
        while True:
            if self._broken is not None:
                raise Unavailable(f"the model's weights could not be restored after a failed reload: {self._broken}")
            if version.weights == self.weights and not self._reloading:
                assert version.weights is not None
                self._waiting_engine[version.weights] = self._waiting_engine.get(version.weights, 0) + 1
                return
            if version.weights != self._target:
                # A swap to this version failed (its waiting requests are refused), or replaced it before it began.
                raise Unavailable(
                    f"version {version.name} stopped being served before this request started "
                    f"(now serving {self.current.name}); retry the request",
                    context={"version": self.current.name},
                )
            await self._changed.wait()

    def _engine_took(self, weights: str) -> None:
        left = self._waiting_engine.get(weights, 0) - 1
        if left > 0:
            self._waiting_engine[weights] = left
        else:
            self._waiting_engine.pop(weights, None)
            self._notify()

    async def _drain(self, weights: str) -> None:
        """Until every request on `weights` is in the engine (pause(wait) then lets the engine finish them)."""
        while self._waiting_engine.get(weights, 0):
            await self._changed.wait()

    async def _reload(self, name: str, path: Any, fallback: tuple[str, Any]) -> None:
        """pause (draining the engine) → reload_weights(path) → reset the prefix cache → resume.

        When the reload fails, `fallback` (version, directory: the weights held before) is reloaded before
        resuming: a failed reload can leave the model half loaded — vLLM's in-place reload first moves the
        parameters to the meta device, and one engine step on them kills the engine core — so nothing may
        run in between. The error propagates either way.
        """
        llm: WeightsLLM = self.llm  # type: ignore[assignment]  # merged mode runs on AsyncLLM
        self._reloading = True
        try:
            await llm.pause_generation(mode="wait", clear_cache=True)
            try:
                try:
                    await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                except Exception as exc:
                    await self._restore(llm, fallback, exc)
                    raise
                # pause(clear_cache) reset it before the reload; this guards anything cached since (nothing
                # may run while paused) and says so when vLLM could not.
                if not await llm.reset_prefix_cache():
                    logger.warning("vLLM did not reset its prefix cache after loading %s's weights", name)
            finally:
                # Also when the restore failed: `_enter_weights` then refuses every request, so none runs.
                await llm.resume_generation()
        finally:
            self._reloading = False

    async def _restore(self, llm: WeightsLLM, fallback: tuple[str, Any], error: Exception) -> None:
        old, path = fallback
        logger.error("loading new weights failed (%s); restoring %s's weights from %s", error, old, path)
        try:
            await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            await llm.reset_prefix_cache()
        except Exception as exc:
            self._broken = f"reloading failed ({error}) and restoring {old}'s weights failed too ({exc})"
            logger.critical("%s; the engine has no usable weights: restart this replica", self._broken)

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
                if self.weights_source is not None:
                    previous = await self._swap_weights(name)
                else:
                    served = await self._load(name)
                    previous, self.current = self.current, served
            except Exception:
                if self.metrics:
                    self.metrics.swaps.labels("error").inc()
                raise
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

    async def _swap_weights(self, name: str) -> ServedVersion:
        """Merged mode: serve `name` from its merged weights (steps in the module docstring); returns the previous
        incumbent. On failure the old weights serve again and the error propagates."""
        assert self.weights_source is not None
        start = time.perf_counter()
        try:
            path = await self.weights_source.ensure(name)  # the old weights serve on meanwhile
        except MergeError:
            raise
        except VersionError as exc:  # no such version on disk
            raise NotFound(str(exc), param="version") from exc
        merged = time.perf_counter()
        old, previous, canary = self.weights, self.current, self.canary
        # From here new requests are `name`'s and wait in `generate` for its weights.
        self._target = name
        self.current = ServedVersion(name, None, weights=name)
        if canary is not None:
            self.canary = None  # its adapter is a delta from the old weights
            self._canary_metrics()
        try:
            await self._drain(old)
            drained = time.perf_counter()
            await self._reload(name, path, fallback=(old, self.weights_source.path(old)))
        except BaseException:
            # The old weights serve again (restored by `_reload` if the reload got that far); requests that
            # waited for `name` are refused with a retryable 503 (`_enter_weights`).
            self.current, self.canary, self._target = previous, canary, None
            self._canary_metrics()
            self._notify()
            raise
        self.weights, self._target, self._broken = name, None, None
        logger.info("weights of %s loaded (merge %.3fs, drain %.3fs, reload %.3fs)", name, merged - start,
                    drained - merged, time.perf_counter() - drained)  # fmt: skip
        self._notify()
        # Every adapter loaded so far is a delta from the old weights (vLLM dropped them on the reload too).
        for version in list(self._loaded.values()):
            await self._unload(version)
        return previous

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
                    served = await self._load_canary(name)
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
        return await self._add_adapter(ServedVersion(name, None), adapter, max(1, version_number(name)))

    async def _add_adapter(self, served: ServedVersion, adapter: Any, lora_id: int) -> ServedVersion:
        served.lora = self._lora_request_cls(lora_name=served.name, lora_int_id=lora_id, lora_path=str(adapter))
        # add_lora loads the weights now, so the first request on the new version pays nothing.
        if not await self.llm.add_lora(served.lora):
            raise RuntimeError(f"the engine refused adapter {adapter}")
        self._loaded[served.key] = served
        if self.metrics:
            self.metrics.loaded_adapters.set(len(self._loaded))
        return served

    async def _load_canary(self, name: str) -> ServedVersion:
        """The canary's version: its adapter, or in merged mode its delta from the weights the engine holds."""
        if self.weights_source is None:
            return ServedVersion(BASE, None) if name == BASE else await self._load(name)
        incumbent = self.weights
        if name == incumbent:
            return ServedVersion(name, None, weights=incumbent)
        key = f"{name}@{incumbent}"
        if key in self._loaded:
            return self._loaded[key]
        try:
            delta = await self.weights_source.delta(name, incumbent)
        except MergeError:  # an adapter kind a delta cannot reproduce
            raise
        except VersionError as exc:  # no such version on disk
            raise NotFound(str(exc), param="version") from exc
        if delta.rank > self.max_lora_rank:
            # Not raised by default: vLLM pads every LoRA to max_lora_rank, so a larger one slows every LoRA request.
            raise MergeError(
                f"canary {name} beside merged {incumbent} needs a LoRA of rank {delta.rank} (the two adapters' "
                f"ranks added), above the engine's max_lora_rank {self.max_lora_rank}; set "
                f"SECONDSTAGE_MAX_LORA_RANK to at least {delta.rank} (vLLM takes 8, 16, 32, 64, ...), train "
                "smaller adapters, or serve in LoRA mode"
            )
        self._next_delta_id += 1
        served = await self._add_adapter(ServedVersion(name, None, weights=incumbent, key=key), delta.path,
                                         self._next_delta_id)  # fmt: skip
        self.weights_source.prepare(name)  # merge it now, so a promotion only reloads
        return served

    async def _unload(self, version: ServedVersion) -> None:
        if self._resident(version) or version.inflight or self._loaded.get(version.key) is not version:
            return
        del self._loaded[version.key]
        with contextlib.suppress(Exception):
            await self.llm.remove_lora(version.lora.lora_int_id)  # type: ignore[union-attr]
        if self.metrics:
            self.metrics.loaded_adapters.set(len(self._loaded))
        logger.info("unloaded version %s", version.name)

    def loaded_versions(self) -> list[str]:
        return list(self._loaded)

    async def check_health(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
