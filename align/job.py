"""The align job: feedback → datasets → LoRA → gate → version → publish, one run at a time.

`run_once` is one run (what `secondstage align run` does); `run_every` repeats it (`--every 30m`).
Only one run works at a time, across machines: it holds redis-py's Redis lock, renewed while it runs, and
publishes only if it still owns the lock then.
A run publishes a version only when the gate passes; only then does it acknowledge the feedback it used, so
anything that fails (training, gate, disk, Redis) leaves the feedback to the next run. A gate refusal is counted
against each entry the run used; an entry refused `max_refusals` times is acknowledged and dead-lettered, so one
batch is not retried forever (align/refusals.py). A run killed between
publishing and acknowledging leaves feedback a published version used: the next run skips it (align/feedback.py).
Before training, a stable share of the feedback is held out for the gate (align/split.py; acknowledged with the
rest on publish), the operator's regression file is validated (an invalid one fails the run before it trains)
and the anchors are sampled from the completion log (align/anchors.py).

Under `accelerate launch` (or torchrun) every process runs this job; only the main one (rank 0) takes the lock,
gates, publishes and acknowledges. The others (`process_rank() > 0`) read the same feedback without consuming
it and train — their share of each step — and return status "worker". They read at about the same moment as the
main process; feedback arriving between the reads can make their datasets differ by those rows (a known limit:
no collective exchange of the batch is done here).

Every run ends with its figures (outcome, duration, rows, gate checks) recorded in align/metrics.py and pushed to
the Pushgateway when `SECONDSTAGE_PUSHGATEWAY_URL` is set — by rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock
from rich.console import Console

from align.anchors import sample_anchors
from align.datasets import AlignData, build_datasets
from align.feedback import FeedbackBatch, FeedbackError, FeedbackReader, load_policies
from align.gate import describe_failure, evaluate_gate
from align.metrics import AlignMetrics
from align.refusals import Refusal, RefusalLedger, RefusalOutcome
from align.regression import RegressionFileError, RegressionSet
from align.regression import load as load_regression
from align.settings import AlignSettings
from align.split import split_batch
from align.train import train_adapter
from core.canary import Rollout
from core.keys import Keys
from core.records import BASE, Manifest
from core.versions import Registry, VersionError, VersionStore

Status = Literal["published", "insufficient", "locked", "dry_run", "gate_failed", "worker", "failed"]

EXIT_CODES: dict[str, int] = {
    "published": 0,
    "insufficient": 0,
    "dry_run": 0,
    "worker": 0,
    "gate_failed": 3,
    "locked": 75,
    "failed": 1,
}
"""CLI exit status per outcome. Each refusal has its own, apart from 1 (the run failed: retrying may help) and 2
(usage), so a scheduler can tell them apart (deploy/k8s/align.yaml does not retry either): 3 the gate refused the
adapter, 75 sysexits' EX_TEMPFAIL ("another run holds the lock, try later"). `worker`: a non-main rank under
`accelerate launch` trained its share and left publishing to rank 0. `failed`: the run raised; `run_once` raises
rather than return it, but it is recorded as an outcome (metrics, `align run --json`)."""


class AlignError(Exception):
    """The run cannot proceed; the message says why and what to do."""


@dataclass
class RunResult:
    status: Status
    message: str
    version: str | None = None
    parent: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    acked: int = 0
    duration_s: float = 0.0
    run_id: str | None = None
    """Names the run in the refusal records (align/refusals.py); set once the run holds the lock."""
    entries: dict[str, int] = field(default_factory=dict)
    """Stream entries by what this run did to them: refused (a gate refusal counted against them) and
    dead_lettered (taken out of training after max_refusals refusals)."""
    dead_letters: int | None = None
    """Entries dead-lettered so far, all runs together (`<p>:align:dead_letters`)."""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank under a distributed launcher; 0 when it runs alone.

    Read from the environment accelerate launch and torchrun set (RANK, global; LOCAL_RANK, per node), not from
    accelerate's `PartialState`: building that state initialises the process group, a side effect the job must
    not have before training does it.
    """
    environ = os.environ if environ is None else environ
    for name in ("RANK", "LOCAL_RANK"):  # RANK first: on several nodes each has a LOCAL_RANK 0
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise AlignError(f"{name}={value!r} is not a process rank (a number ≥ 0); unset it or fix the launcher")
            return int(value)
    return 0


def align_lock(client: redis.Redis, key: str, ttl_s: int) -> Lock:
    """redis-py's lock (SET NX PX with an owner token, released only by its owner); a second run gives up at once.

    thread_local=False: the renewal thread (`renewing`) must see the token the run's thread acquired.
    """
    return client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)


@contextlib.contextmanager
def renewing(lock: Lock, console: Console) -> Iterator[None]:
    """Reset the lock's TTL every third of it while the block runs.

    The TTL only has to cover a crash: a run longer than lock_ttl_s keeps its lock, and a crashed one frees it
    within lock_ttl_s. A renewal that finds the lock gone (it expired while Redis was unreachable, say) stops;
    the run then sees that before publishing.
    """
    stop = threading.Event()
    every_s = float(lock.timeout or 0) / 3

    def renew() -> None:
        while not stop.wait(every_s):
            try:
                lock.reacquire()
            except LockNotOwnedError:
                console.print(f"[red]lost the align lock {lock.name}: this run will not publish")
                return
            except redis.RedisError as e:
                # Redis may come back before the TTL runs out: keep trying.
                console.print(f"[yellow]could not renew the align lock {lock.name}: {e}; retrying")

    thread = threading.Thread(target=renew, name="align-lock-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def open_redis(settings: AlignSettings) -> Iterator[redis.Redis]:
    """The Redis serve uses (configured URL, or the private server under var/redis — started here if absent)."""
    from core.redis_server import RedisServerError, resolve_redis

    try:
        url, child = resolve_redis(settings)
    except RedisServerError as e:  # e.g. serve is restarting its private Redis and it did not come back in time
        raise AlignError(str(e)) from e
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as e:
        raise AlignError(f"cannot reach Redis at {url}: {e}; check SECONDSTAGE_REDIS_URL (or unset it)") from e
    try:
        yield client
    finally:
        client.close()
        if child is not None:
            child.stop()


def _parent_adapter(settings: AlignSettings, registry: Registry, store: VersionStore, parent: str) -> Path | None:
    """The active version's adapter to continue from, or None to start a fresh adapter on the base model."""
    if parent == BASE:
        return None
    manifest = registry.manifests().get(parent)
    if manifest is not None and manifest.base_model != settings.model_path:
        # An adapter only fits the base it was trained on; a new base starts a new lineage.
        return None
    path = store.adapter_path(parent)
    if not (path / "adapter_config.json").is_file():
        raise AlignError(
            f"the active version {parent!r} has no adapter at {path}; restore that directory, or activate "
            "another version (`secondstage versions activate base`) and run again"
        )
    return path


def run_once(
    settings: AlignSettings,
    *,
    all_feedback: bool = False,
    dry_run: bool = False,
    console: Console | None = None,
    client: redis.Redis | None = None,
    metrics: AlignMetrics | None = None,
) -> RunResult:
    """One align run; see the module docstring. Pass `client` to reuse a connection (tests, `run_every`).

    Its figures go to `metrics` (a fresh `AlignMetrics` by default) and, when settings.pushgateway_url is set,
    to the Pushgateway — also when the run raises (outcome "failed"); a failed push does not change the result.
    """
    console = console or Console(stderr=True)
    metrics = metrics if metrics is not None else AlignMetrics()
    started = time.monotonic()
    try:
        result = _run_once(settings, all_feedback=all_feedback, dry_run=dry_run, console=console, client=client)
    except BaseException:
        # BaseException: a Ctrl-C mid-run is a failed run too; the exception goes on unchanged.
        metrics.record("failed", duration_s=time.monotonic() - started)
        _push(settings, metrics, console)
        raise
    result.duration_s = round(time.monotonic() - started, 3)
    metrics.record(
        result.status,
        duration_s=result.duration_s,
        counts=result.counts,
        gate=result.gate,
        version=result.version,
        entries=result.entries,
        dead_letters=result.dead_letters,
    )
    _push(settings, metrics, console)
    return result


def _push(settings: AlignSettings, metrics: AlignMetrics, console: Console) -> None:
    # Only rank 0 pushes: N ranks pushing to one Pushgateway group would overwrite one another's figures.
    if settings.pushgateway_url and process_rank() == 0:
        metrics.push(settings.pushgateway_url, console)


def _run_once(
    settings: AlignSettings,
    *,
    all_feedback: bool,
    dry_run: bool,
    console: Console,
    client: redis.Redis | None,
) -> RunResult:
    if client is None:
        with open_redis(settings) as c:
            return _run_once(settings, all_feedback=all_feedback, dry_run=dry_run, console=console, client=c)

    keys = Keys(settings.redis_prefix)
    rank = process_rank()
    if rank > 0:
        return _run_worker(settings, client, keys, rank, all_feedback=all_feedback, dry_run=dry_run, console=console)
    lock = align_lock(client, keys.align_lock, settings.lock_ttl_s)
    if not lock.acquire():
        msg = (
            f"another align run holds the lock {keys.align_lock} (expires in {client.ttl(keys.align_lock)}s); "
            "nothing done. If no run is alive, delete that key or wait for it to expire."
        )
        console.print(f"[yellow]{msg}")
        return RunResult("locked", msg)
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        with renewing(lock, console):
            result = _run_locked(
                settings, client, keys, lock, run_id, all_feedback=all_feedback, dry_run=dry_run, console=console
            )
            result.run_id = run_id
            return result
    finally:
        # A lock that expired (and may have been retaken) is not ours to delete: redis-py checks the token.
        with contextlib.suppress(LockNotOwnedError):
            lock.release()


def _run_locked(
    settings: AlignSettings,
    client: redis.Redis,
    keys: Keys,
    lock: Lock,
    run_id: str,
    *,
    all_feedback: bool,
    dry_run: bool,
    console: Console,
) -> RunResult:
    reader, batch, data, heldout, skip = _read_feedback(
        settings, client, keys, all_feedback=all_feedback, consume=not dry_run, dry_run=dry_run, console=console
    )
    ledger = RefusalLedger(client, keys, max_refusals=settings.max_refusals)

    def done(result: RunResult) -> RunResult:
        # Entries the read found refused max_refusals times were dead-lettered by it (a consuming read).
        if not dry_run:
            found = batch.skipped.get("dead_lettered", 0)
            result.entries = {
                "refused": result.entries.get("refused", 0),
                "dead_lettered": result.entries.get("dead_lettered", 0) + found,
            }
        result.dead_letters = ledger.dead_letter_count()
        return result

    if skip is not None:
        return done(skip)

    registry = Registry(client, keys)
    store = VersionStore(settings.versions_dir)
    # The promoted version (the incumbent), never a running canary: a canary may still be rolled back.
    parent = registry.active()
    parent_adapter = _parent_adapter(settings, registry, store, parent)
    # Gather what the gate needs before training, so a bad regression file fails the run in seconds, not after it.
    regression, regression_note = _regression_set(settings) if settings.gate_enabled else (None, "")
    anchors = (
        sample_anchors(
            client,
            keys,
            parent=parent,
            count=settings.gate_anchor_count,
            scan=settings.gate_anchor_scan,
            exclude={item.completion_id for item in batch.feedback},
        )
        if settings.gate_enabled
        else []
    )
    work_root = settings.var_dir / "align"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=work_root) as tmp:
        trained = _train(settings, data, Path(tmp), parent_adapter=parent_adapter, console=console)
        if settings.gate_enabled:
            with console.status("gating the adapter"):
                gate = evaluate_gate(
                    settings,
                    data,
                    trained.adapter_dir,
                    trained.metrics,
                    parent_adapter=parent_adapter,
                    heldout=heldout,
                    regression=regression,
                    regression_note=regression_note,
                    anchors=anchors,
                )
            console.print(
                f"gate: {len(gate['checks'])} checks in {gate.get('duration_s', 0):.1f}s, failed: {gate['failed']}"
            )
        else:
            gate = {"passed": True, "failed": [], "checks": {}, "skipped": "gate_enabled=false"}
        # Held-out feedback is consumed with the rest when the version publishes (align/split.py says why).
        gate = {**gate, "heldout_feedback_ids": heldout.feedback_ids}
        if not gate["passed"]:
            reason = describe_failure(gate)
            refusal = _count_refusal(reader, batch, lock, run_id, gate, reason, all_feedback=all_feedback)
            msg = f"gate failed, nothing published, feedback left for the next run: {reason}"
            if refusal.dead_lettered:
                msg += (
                    f"; {refusal.dead_lettered} entries refused {settings.max_refusals} times (max_refusals) were "
                    "taken out of training (`secondstage align refusals` lists them)"
                )
            console.print(f"[red]{msg}")
            return done(
                RunResult(
                    "gate_failed",
                    msg,
                    parent=parent,
                    counts=data.summary(),
                    metrics=trained.metrics,
                    gate=gate,
                    entries={"refused": refusal.refused, "dead_lettered": refusal.dead_lettered},
                )
            )
        # Publish only while this run owns the lock: one that lost it may be overlapping a newer run.
        if not lock.owned():
            raise AlignError(
                f"lost the align lock {keys.align_lock} during the run (it expired or was deleted while it could "
                "not be renewed; check Redis); nothing published, feedback left for the next run"
            )
        return done(
            _publish(settings, registry, store, reader, batch, data, trained, gate, parent, parent_adapter, console)
        )


def _count_refusal(
    reader: FeedbackReader,
    batch: FeedbackBatch,
    lock: Lock,
    run_id: str,
    gate: dict[str, Any],
    reason: str,
    *,
    all_feedback: bool,
) -> RefusalOutcome:
    """Count the refusal against every entry the run used (align/refusals.py); dead-letter those at max_refusals.

    Not for `--all` runs (an explicit retrain on everything says nothing about one batch), nor for a run that lost
    its lock (it may overlap a newer run: a missed count only delays dead-lettering by one refusal).
    """
    if all_feedback or reader.refusals is None or not lock.owned():
        return RefusalOutcome(0, 0)
    refusal = Refusal(run=run_id, at=time.time(), failed=[str(f) for f in gate.get("failed", [])], reason=reason[:500])
    return reader.refusals.refuse(reader.used(batch), refusal, reader.group)


def _read_feedback(
    settings: AlignSettings,
    client: redis.Redis,
    keys: Keys,
    *,
    all_feedback: bool,
    consume: bool,
    dry_run: bool,
    console: Console,
) -> tuple[FeedbackReader, FeedbackBatch, AlignData, AlignData, RunResult | None]:
    """Read and shape the feedback: (reader, batch, training rows, held-out rows, result when there is nothing
    to train). The held-out rows (align/split.py) never train; the whole batch is what gets acknowledged."""
    try:
        reader = FeedbackReader(
            client,
            keys,
            consumer=settings.consumer_name,
            max_rows_per_user=settings.max_rows_per_user,
            include_policy_pairs=settings.include_policy_pairs,
            missing_completion_wait_s=settings.missing_completion_wait_s,
            max_rows=settings.max_rows_per_run,
            # Corrections pass the operator's rules again before they may train (align/feedback.py).
            policies=load_policies(settings.policies_dir),
            # Entries the gate refused max_refusals times never train again (align/refusals.py).
            refusals=RefusalLedger(client, keys, max_refusals=settings.max_refusals),
        )
        with console.status("reading feedback"):
            batch = reader.read(all_feedback=all_feedback, consume=consume)
    except FeedbackError as e:
        raise AlignError(str(e)) from e
    split = split_batch(batch, settings.heldout_share)
    data = build_datasets(split.train)
    heldout = build_datasets(split.heldout)
    data.counts.update(batch.screened)  # e.g. correction_redacted: in the manifest's datasets counts
    counts = data.summary()
    console.print(
        f"feedback: {len(batch.feedback)} entries, {len(batch.policy_pairs)} policy pairs → "
        f"{len(data.dpo_rows)} DPO pairs, {len(data.kto_rows)} KTO rows"
        + (f" (skipped: {dict(batch.skipped)})" if batch.skipped else "")
        + f"; held out for the gate: {len(heldout.dpo_rows)} DPO pairs, {len(heldout.kto_rows)} KTO rows"
    )
    if data.usable < settings.min_feedback:
        msg = (
            f"not enough feedback to train: {data.usable} usable rows, need {settings.min_feedback} "
            "(SECONDSTAGE_MIN_FEEDBACK / --min-feedback); nothing published"
        )
        console.print(f"[yellow]{msg}")
        return reader, batch, data, heldout, RunResult("insufficient", msg, counts=counts)
    if dry_run:
        msg = f"dry run: would train on {data.usable} rows; nothing trained, published or acknowledged"
        console.print(msg)
        return reader, batch, data, heldout, RunResult("dry_run", msg, counts=counts)
    return reader, batch, data, heldout, None


def _run_worker(
    settings: AlignSettings,
    client: redis.Redis,
    keys: Keys,
    rank: int,
    *,
    all_feedback: bool,
    dry_run: bool,
    console: Console,
) -> RunResult:
    """A non-main process of a distributed run: read without consuming, train; no lock, gate, publish or ack."""
    _, _, data, _, skip = _read_feedback(
        settings, client, keys, all_feedback=all_feedback, consume=False, dry_run=dry_run, console=console
    )
    if skip is not None:
        return skip
    registry = Registry(client, keys)
    parent = registry.active()
    parent_adapter = _parent_adapter(settings, registry, VersionStore(settings.versions_dir), parent)
    work_root = settings.var_dir / "align"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"run-rank{rank}-", dir=work_root) as tmp:
        trained = _train(settings, data, Path(tmp), parent_adapter=parent_adapter, console=console)
    msg = f"process rank {rank} trained its share; the main process (rank 0) gates, publishes and acknowledges"
    console.print(msg)
    return RunResult("worker", msg, parent=parent, counts=data.summary(), metrics=trained.metrics)


def _regression_set(settings: AlignSettings) -> tuple[RegressionSet | None, str]:
    """The operator's regression set, or None and why. The default path may be absent (a deployment without
    one); a path set explicitly must exist. An invalid file fails the run (AlignError naming file, line, field)."""
    path = settings.regression_file
    if not path.is_file() and "regression_file" not in settings.model_fields_set:
        return None, f"no regression file at {path} (SECONDSTAGE_REGRESSION_FILE): regression set not checked"
    try:
        return load_regression(path), ""
    except RegressionFileError as e:
        raise AlignError(f"{e}; nothing trained, feedback left for the next run") from e


def _train(settings: AlignSettings, data: AlignData, work_dir: Path, **kw: Any) -> Any:
    # One indirection, so the rank tests can replace training (minutes of CPU) with a fake.
    return train_adapter(settings, data, work_dir, **kw)


def _publish(
    settings: AlignSettings,
    registry: Registry,
    store: VersionStore,
    reader: FeedbackReader,
    batch: FeedbackBatch,
    data: AlignData,
    trained: Any,
    gate: dict[str, Any],
    parent: str,
    parent_adapter: Path | None,
    console: Console,
) -> RunResult:
    version = store.next_name()
    manifest = Manifest(
        version=version,
        # Lineage: the parent is the version whose adapter this one continued from (base when started fresh).
        parent=parent if parent_adapter is not None else BASE,
        base_model=settings.model_path,
        feedback_ids=data.feedback_ids,
        policy_pair_ids=data.policy_pair_ids,
        datasets=data.summary(),
        metrics=trained.metrics,
        gate=gate,
        lora_rank=trained.lora_rank,
    )
    try:
        path = store.write(manifest, trained.adapter_dir)
    except VersionError as e:
        raise AlignError(f"cannot write version {version}: {e}") from e
    registry.register(manifest)
    if settings.canary_enabled:
        # A canary first: live signals against the incumbent promote it or roll it back (serve decides).
        Rollout(registry.client, registry.keys).start(
            version, settings.canary_share, trigger="align", reason=f"gate passed; trained from {manifest.parent}"
        )
        served = f"as a canary for {settings.canary_share:.0%} of callers"
    else:
        registry.activate(version)
        served = "for everyone"
    if reader.refusals is not None:
        # Consumed by this version: never read again, so their refusal counts go (before the acknowledgement,
        # so a kill in between leaves nothing stale; the next run skips the entries as already_trained).
        reader.refusals.forget(reader.used(batch))
    acked = reader.ack(batch)
    msg = f"published {version} (parent {manifest.parent}) at {path} {served}; acknowledged {acked} stream entries"
    console.print(f"[green]{msg}")
    return RunResult(
        "published",
        msg,
        version=version,
        parent=manifest.parent,
        counts=manifest.datasets,
        metrics=trained.metrics,
        gate=gate,
        acked=acked,
    )


def run_every(
    settings: AlignSettings,
    interval_s: float,
    *,
    all_feedback: bool = False,
    dry_run: bool = False,
    console: Console | None = None,
    stop: threading.Event | None = None,
    max_runs: int | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run, then wait `interval_s`, until `stop` is set or `max_runs` runs are done. `all_feedback` applies once.

    A run that raises is reported and the loop goes on: the next run retries the same unacknowledged feedback.
    `on_result` sees each run as it ends, a failed one as a "failed" result (`align run --every --json`).
    """
    console = console or Console(stderr=True)
    stop = stop or threading.Event()
    results: list[RunResult] = []
    with open_redis(settings) as client:
        runs = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = run_once(
                    settings,
                    all_feedback=all_feedback and runs == 0,
                    dry_run=dry_run,
                    console=console,
                    client=client,
                )
                results.append(result)
            except (AlignError, redis.RedisError, OSError, RuntimeError, ValueError) as e:
                console.print(f"[red]align run failed: {type(e).__name__}: {e}; retrying in {interval_s:.0f}s")
                result = RunResult(
                    "failed", f"{type(e).__name__}: {e}", duration_s=round(time.monotonic() - started, 3)
                )
            if on_result is not None:
                on_result(result)
            runs += 1
            if max_runs is not None and runs >= max_runs:
                break
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    return results
