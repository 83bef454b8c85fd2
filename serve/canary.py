"""The canary on a serving replica: live signals per version, and the periodic judge that decides.

`SignalRecorder` counts, per canary run and role (canary or incumbent), what this replica saw: requests,
errors, policy violations and TTFT when a request ends (`request`), thumbs, ratings and corrections when
feedback on a completion of the run arrives (`feedback`; the completion's record names the version that
answered it). Counts accumulate in memory and `flush` adds them to `<p>:canary:signals:<run>` with one
pipeline of HINCRBY/HINCRBYFLOAT (every replica adds to the same hash), so the request path never waits on
Redis; while Redis is away they stay pending and go with the next flush.

`CanaryJudge` runs on every replica every `canary_eval_interval_s`: it reads the canary and its signals,
applies `core.canary.evaluate`, and writes a promote or rollback through the transition script, which
applies only if the judged run is still the running one — so when several replicas judge at once, exactly
one decision is written and the others find the run over. It also refreshes the cluster-wide figures
`/metrics` exports (decisions ever made, the running canary's signals), read from Redis so every replica
reports the same values and operator decisions count too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from core.canary import CanaryState, Criteria, Signals, Verdict, aread, atransition, evaluate
from core.keys import Keys
from serve.services.records import completion_id_time

if TYPE_CHECKING:
    from serve.engine import ModelEngine
    from serve.metrics import Metrics
    from serve.protocol import FeedbackRequest
    from serve.services.generation import Job

logger = logging.getLogger("secondstage.canary")


class SignalRecorder:
    def __init__(self, engine: ModelEngine, keys: Keys) -> None:
        self.engine = engine
        self.keys = keys
        self._pending: dict[str, defaultdict[str, float]] = {}

    def _add(self, run: str, role: str, **counts: float) -> None:
        bucket = self._pending.setdefault(run, defaultdict(float))
        for name, value in counts.items():
            if value:
                bucket[f"{role}.{name}"] += value

    def request(self, job: Job) -> None:
        """A request ended: count it under its canary run and role (none while no canary runs)."""
        if job.canary is None or job.refusal is not None:
            return  # a refusal never reached the model: it says nothing about the version
        run, role = job.canary
        canary = self.engine.canary
        if canary is None or canary.run != run:
            return  # the run was decided while this request ran: its evidence is closed
        error = job.failed or any(c.finish_reason == "error" for c in job.choices)
        violation = any(
            d.stage == "output" for c in job.choices if c.filter is not None for d in c.filter.decisions
        )  # fmt: skip
        ttft = None if job.first_token_at is None else job.first_token_at - job.clock
        self._add(
            run,
            role,
            requests=1,
            errors=int(error),
            violations=int(violation),
            ttft_sum=ttft or 0.0,
            ttft_count=int(ttft is not None),
        )

    def feedback(self, version: str | None, completion_id: str, req: FeedbackRequest) -> None:
        """Feedback on a completion `version` made: counted when it was made during the running canary."""
        canary = self.engine.canary
        if canary is None or version is None:
            return
        role = "canary" if version == canary.version.name else "incumbent" if version == canary.incumbent else None
        made = completion_id_time(completion_id)
        if role is None or (made is not None and made < canary.since):
            return  # another version, or a completion from before the run: not this comparison's evidence
        self._add(
            canary.run,
            role,
            feedback=1,
            thumbs_up=int(req.thumbs == "up"),
            thumbs_down=int(req.thumbs == "down"),
            corrections=int(req.correction is not None),
            negative=int(req.thumbs == "down" or req.correction is not None),
            ratings=int(req.rating is not None),
            rating_sum=req.rating or 0,
            rating_sumsq=(req.rating or 0) ** 2,
        )

    async def flush(self, client: aioredis.Redis) -> None:
        """Add what accumulated to Redis; kept for the next flush when Redis does not answer."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            async with client.pipeline(transaction=False) as pipe:
                for run, counts in pending.items():
                    key = self.keys.canary_signals(run)
                    for name, value in counts.items():
                        if float(value).is_integer():
                            pipe.hincrby(key, name, int(value))
                        else:
                            pipe.hincrbyfloat(key, name, value)
                await pipe.execute()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            logger.warning("cannot write canary signals (%s); keeping them for the next flush", exc)
            for run, counts in pending.items():
                for name, value in counts.items():
                    role, _, signal = name.partition(".")
                    self._add(run, role, **{signal: value})


class CanaryJudge:
    def __init__(
        self,
        recorder: SignalRecorder,
        client_factory: Callable[[], aioredis.Redis],
        keys: Keys,
        criteria: Criteria,
        *,
        interval_s: float,
        metrics: Metrics | None = None,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.recorder = recorder
        self.client_factory = client_factory
        self.keys = keys
        self.criteria = criteria
        self.interval_s = interval_s
        self.flush_interval_s = min(flush_interval_s, interval_s)
        self.metrics = metrics
        self.last: Verdict | None = None
        """The last verdict this replica reached (None: no canary ran at the last look)."""

    async def judge(self, client: aioredis.Redis) -> Verdict | None:
        """Judge the running canary once; write the decision when there is one (it may lose to another replica)."""
        await self._refresh_decisions(client)
        _, state = await aread(client, self.keys)
        if state is None:
            if self.metrics:
                self.metrics.set_canary_signals(None)
            self.last = None
            return None
        signals = Signals.parse(await client.hgetall(self.keys.canary_signals(state.run)))
        if self.metrics:
            self.metrics.set_canary_signals(signals)
        verdict = evaluate(signals["canary"], signals["incumbent"], time.time() - state.since, self.criteria)
        self.last = verdict
        if verdict.decision != "wait":
            await self._decide(client, state, verdict)
        return verdict

    async def _decide(self, client: aioredis.Redis, state: CanaryState, verdict: Verdict) -> None:
        done = await atransition(
            client,
            self.keys,
            verdict.decision,
            version=state.version,
            run=state.run,
            trigger="auto",
            reason=verdict.reason,
        )
        if not done.applied:
            logger.info("canary %s: another replica decided first (%s)", state.version, done.refusal)
            return
        log = logger.warning if verdict.decision == "rollback" else logger.info
        log("canary %s %s: %s", state.version, "rolled back" if verdict.decision == "rollback" else "promoted",
            verdict.reason)  # fmt: skip
        await self._refresh_decisions(client)

    async def _refresh_decisions(self, client: aioredis.Redis) -> None:
        if self.metrics is None:
            return
        raw: dict[Any, Any] = await client.hgetall(self.keys.canary_decisions)
        counts = {}
        for key, value in raw.items():
            decision, _, trigger = (key.decode() if isinstance(key, bytes) else str(key)).partition(".")
            counts[(decision, trigger)] = int(value)
        self.metrics.canary_decisions_seen = counts

    async def run(self, stop: asyncio.Event) -> None:
        """Flush signals every `flush_interval_s`, judge every `interval_s`, until `stop`."""
        client = self.client_factory()
        next_judge = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    await self.recorder.flush(client)
                    if time.monotonic() >= next_judge:
                        next_judge = time.monotonic() + self.interval_s
                        await self.judge(client)
                except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                    logger.warning("canary judge cannot reach Redis (%s); retrying", exc)
                except Exception:
                    logger.exception("canary judge failed; retrying")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.flush_interval_s)
            with contextlib.suppress(Exception):
                await self.recorder.flush(client)  # what the last requests added
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
