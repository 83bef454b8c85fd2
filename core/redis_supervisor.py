"""Supervise the private `redis-server` as a process supervisor would: restart it when it exits.

`secondstage serve` runs one `RedisSupervisor` for its lifetime (see serve/app.py). It holds an
exclusive flock on `<data_dir>/supervisor.lock` (with its pid inside), so other commands know the
directory's Redis is looked after and wait for it instead of starting a second server on the same
data (`core.redis_server.resolve_redis`). A second serve on the directory is refused.

A thread watches the server: the child's exit (`Popen.wait`), or — for a server it found already
running and adopted (left by a crashed serve, or started by a CLI command) — PING every `poll_s`.
When the server goes away the supervisor logs why (exit status or signal, and Redis' last warning),
waits, and starts a new child on the same directory and socket; Redis replays its AOF on start.
Clients reconnect to the same socket (the log writer notices at its next ping and replays its spool).

Backoff: `min_delay_s`, doubling per restart, capped at `max_delay_s`; it drops back to `min_delay_s`
once a child has stayed up `stable_s`, so a killed child is back at once but a crash loop does not
become a restart storm. After `degrade_after` failed starts in a row (the child exits while starting:
a corrupt AOF, a full disk, a bad config) the state is `failed` with Redis' own reason, and the
supervisor keeps trying at `max_delay_s`, so repairing the directory brings the server back.

States: `up`, `restarting` (down, being brought back), `failed` (cannot be brought back), `stopped`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from core.redis_server import SUPERVISOR_LOCK, PrivateRedis, RedisServerError

log = logging.getLogger("secondstage.redis")

UP, RESTARTING, FAILED, STOPPED = "up", "restarting", "failed", "stopped"


def describe_exit(code: int) -> str:
    """An exit status as a person reads it ("killed by SIGKILL", "exited with code 1")."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class RedisSupervisor:
    """Keeps one private redis-server running on `server`'s directory; see the module docstring.

    `on_restart(result)` is called after each restart attempt with "ok" or "failed" (serve counts
    them in `secondstage_redis_restarts_total`).
    """

    def __init__(
        self,
        server: PrivateRedis,
        *,
        min_delay_s: float = 0.25,
        max_delay_s: float = 30.0,
        stable_s: float = 30.0,
        degrade_after: int = 3,
        poll_s: float = 0.5,
        start_timeout_s: float = 10.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < min_delay_s <= max_delay_s:
            raise ValueError(
                f"RedisSupervisor min_delay_s={min_delay_s} and max_delay_s={max_delay_s} must satisfy "
                "0 < min_delay_s <= max_delay_s"
            )
        if degrade_after < 1:
            raise ValueError(f"RedisSupervisor degrade_after={degrade_after} must be at least 1")
        self.server = server
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.stable_s = stable_s
        self.degrade_after = degrade_after
        self.poll_s = poll_s
        self.start_timeout_s = start_timeout_s
        self._on_restart = on_restart
        self.state = STOPPED
        self.reason: str | None = None
        """Why the server is not up (exit status, Redis' last warning); None while it is."""
        self.restarts = 0
        """Successful restarts since `start()`."""
        self.failed_starts = 0
        """Failed start attempts in a row (reset by a successful one)."""
        self.last_delay_s = 0.0
        """The wait before the latest restart attempt (the backoff in effect)."""
        self._backoff = 0  # restarts since the last child that stayed up `stable_s`
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def up(self) -> bool:
        return self.state == UP

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Take the directory's supervisor lock, start (or adopt) the server, and watch it from a thread.

        Raises `RedisServerError` if another process supervises the directory or the server cannot start.
        """
        if self._thread is not None:
            return
        self._take_lock()
        try:
            self.server.start(self.start_timeout_s)
        except BaseException:
            self._release_lock()
            raise
        self.state, self.reason = UP, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="redis-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, shut down the child this supervisor started (cleanly: the AOF is flushed), unlock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.server.stop()
        self.state = STOPPED
        self._release_lock()

    def _take_lock(self) -> None:
        data_dir = self.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = data_dir / SUPERVISOR_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # A command checking who supervises holds a shared lock for an instant: try for a second.
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RedisServerError(
                        f"the private Redis in {data_dir} is already supervised by another process (pid {holder}, "
                        f"lock {path}): another `secondstage serve` runs on this var directory; stop it, or give "
                        "this one its own SECONDSTAGE_VAR_DIR"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # --- the watch thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            why = self._watch()
            if why is None:  # stopping
                return
            if time.monotonic() - started >= self.stable_s:
                self._backoff = 0
            self.state, self.reason = RESTARTING, why
            log.warning("private redis-server at %s %s; restarting it", self.server.socket_path, why)
            self._bring_back(why)

    def _watch(self) -> str | None:
        """Block until the server goes away: why it went, or None when asked to stop."""
        if self.server.owned:
            while not self._stop.is_set():
                code = self.server.wait_exit(self.poll_s)
                if code is not None:
                    # A signal came from outside; an exit status is Redis giving up, and its log says why.
                    warning = self.server.last_warning() if code > 0 else None
                    return describe_exit(code) + (f" ({warning})" if warning else "")
            return None
        # Adopted: not our child, so its exit is only visible as silence. Two misses: one slow PING is not an outage.
        misses = 0
        while not self._stop.wait(self.poll_s):
            misses = 0 if self.server.ping() else misses + 1
            if misses >= 2:
                return "stopped answering PING (a server this process adopted, not its child)"
        return None

    def _bring_back(self, why: str) -> None:
        """Restart with backoff until a child answers or the supervisor stops."""
        down_since = time.monotonic()
        while True:
            delay = self.last_delay_s = min(self.max_delay_s, self.min_delay_s * 2**self._backoff)
            self._backoff = min(self._backoff + 1, 32)  # past the cap anyway; an unbounded power would overflow
            if self._stop.wait(delay):
                return
            try:
                self.server.start(self.start_timeout_s)
            except RedisServerError as exc:
                self.failed_starts += 1
                warning = self.server.last_warning()
                self.reason = f"redis-server cannot be restarted ({self.failed_starts} attempts): " + (
                    warning or str(exc).splitlines()[0]
                )
                self._notify("failed")
                if self.failed_starts >= self.degrade_after:
                    if self.state != FAILED:
                        log.error(
                            "private redis-server in %s cannot be brought back; retrying every %.0fs. %s",
                            self.server.data_dir, self.max_delay_s, exc,
                        )  # fmt: skip
                    self.state = FAILED
                else:
                    log.warning("restarting the private redis-server failed: %s", self.reason)
                continue
            self.restarts += 1
            self.failed_starts = 0
            self._notify("ok")  # counted before it shows as up, so a reader that saw it up sees the count
            self.state, self.reason = UP, None
            log.info(
                "private redis-server back (pid %s) after %.1fs down (%s); restarts so far: %d",
                self.server.pid, time.monotonic() - down_since, why, self.restarts,
            )  # fmt: skip
            return

    def _notify(self, result: str) -> None:
        if self._on_restart is None:
            return
        try:
            self._on_restart(result)
        except Exception:
            # A metrics callback must not take the supervisor down with it.
            log.exception("redis supervisor's on_restart callback failed")
