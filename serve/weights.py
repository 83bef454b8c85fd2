"""Where the engine's weights come from in merged-weights mode (SECONDSTAGE_MERGED_WEIGHTS).

`MergedWeights` hands `ModelEngine` what a merged swap needs, off the event loop: a version's merged
weights directory (`ensure`: merged by `python -m core.merge` in a subprocess when missing, so neither the
GIL nor a full model copy's memory stays with the server; concurrent asks for one version share one merge)
and the delta adapter a canary is served with on top of the incumbent's merged weights (`delta`: small
tensors, built in a worker thread). What these artefacts are and where they live: core/merge.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from core.merge import Delta, MergeError, delta_adapter, delta_path, merged_path, merged_ready
from core.versions import BASE, VersionStore

logger = logging.getLogger("secondstage.weights")


class MergedWeights:
    def __init__(self, store: VersionStore, base_model: str) -> None:
        self.store = store
        self.base_model = base_model
        self._merging: dict[str, asyncio.Task[Path]] = {}

    def path(self, name: str) -> Path:
        """The directory `reload_weights` reads for `name` (the base model's own for `base`)."""
        return Path(self.base_model) if name == BASE else merged_path(self.store, name)

    def _adapter(self, name: str) -> Path:
        return self.store.adapter_path(self.store.manifest(name).version)

    async def ensure(self, name: str) -> Path:
        """`name`'s merged weights directory, merged first when missing (MergeError when that fails)."""
        if name == BASE:
            return self.path(BASE)
        task = self._merging.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._merge(name))
            self._merging[name] = task
            task.add_done_callback(lambda t: self._merging.pop(name, None))
        return await asyncio.shield(task)  # one waiter cancelled (e.g. shutdown) must not cancel the others' merge

    def prepare(self, name: str) -> None:
        """Start merging `name` in the background (a canary's, so that its promotion only reloads)."""
        if name == BASE or name in self._merging:
            return

        def _done(task: asyncio.Task[Path]) -> None:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("could not merge %s ahead of its promotion: %s", name, task.exception())

        asyncio.get_running_loop().create_task(self.ensure(name)).add_done_callback(_done)

    async def _merge(self, name: str) -> Path:
        adapter, out = self._adapter(name), self.path(name)
        if await asyncio.to_thread(merged_ready, out, self.base_model, adapter):
            return out
        start = time.perf_counter()
        logger.info("merging version %s into full weights at %s", name, out)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "core.merge",
            self.base_model,
            str(adapter),
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:  # shutting down: do not leave a merge running behind the server
            proc.kill()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise MergeError(f"merging version {name} failed (exit {proc.returncode}): {' | '.join(tail)}")
        logger.info("merged version %s in %.1fs", name, time.perf_counter() - start)
        return out

    async def delta(self, target: str, incumbent: str) -> Delta:
        """The adapter that turns `incumbent`'s merged weights into `target`'s (its own adapter on `base`)."""
        return await asyncio.to_thread(
            delta_adapter,
            None if target == BASE else self._adapter(target),
            None if incumbent == BASE else self._adapter(incumbent),
            delta_path(self.store, target, incumbent) if incumbent != BASE else self.store.path(target),
        )
