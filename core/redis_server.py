"""A private `redis-server` child process, and how serve and align find the Redis they share.

With no `SECONDSTAGE_REDIS_URL`, secondstage runs its own real Redis: data under `var/redis`
(AOF on, fsync every second), reachable only through a unix socket `var/redis/redis.sock`
(mode 700, no TCP port). Whoever comes first starts it; whoever finds it already answering
uses it. `resolve_redis(settings)` does exactly that and is the one way both deployables
get their Redis URL. `secondstage serve` also supervises it (core/redis_supervisor.py: restarts
with backoff, holds `supervisor.lock`); while it does, other commands never start a second server
on the directory: they wait for serve's to come back, or fail saying why.

Access: a password, generated on the first start into `var/redis/password` (mode 0600), is
given to redis-server through a config file (`var/redis/redis.conf`, 0600; not the command line,
where `ps` would show it); `url` carries it, so every client built from the URL authenticates, and
one without it gets NOAUTH. Memory: `maxmemory` (SECONDSTAGE_REDIS_MAXMEMORY, default 1gb) with
the policy `noeviction`: at the cap Redis refuses writes (OOM), which the log writer treats as an
outage and spools to disk; an evicting policy would delete records, lookup keys or the registry
silently. Retention keeps the data well below the cap (docs/security.md, "Data at rest").

Tests use `PrivateRedis` directly as their Redis (start, `kill()` for an outage, `restart()`
on the same directory keeps the data through the AOF).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.settings import CommonSettings

log = logging.getLogger("secondstage.redis")

# sockaddr_un.sun_path is 108 bytes on Linux, including the trailing NUL.
_MAX_SOCKET_PATH = 107
# Held (flock, exclusive) by the process that supervises the server in a data directory; contains its pid.
SUPERVISOR_LOCK = "supervisor.lock"
# A redis log line: "<pid>:<role> <date> <time> <level> <message>"; level "#" is a warning.
_WARNING_LINE = re.compile(r"^\d+:[A-Z] .+? # (.+)$")


class RedisServerError(RuntimeError):
    """The private redis-server could not be started, reached or stopped."""


class PrivateRedis:
    """One `redis-server` bound to a unix socket inside `data_dir`.

    `start()` reuses a server that already answers on the socket (then `owned` is False and
    `stop()` leaves it running); otherwise it starts a child process that `stop()` shuts down.
    The child runs in its own session, so Ctrl-C reaches only the parent, which flushes its logs
    to Redis before stopping it; if the parent dies without `stop()`, the server keeps running
    and the next `start()` on the directory reuses it.

    `appendfsync` defaults to "always" because serve treats a write Redis acknowledged as safe and forgets
    it: with "everysec", Redis 7.0 (Debian's) defers the AOF write for up to 2 s while a background fsync is
    slow, yet still acknowledges, so a SIGKILL then loses records serve already dropped from its spool (seen
    on a busy CI machine: 9 of 20 completion records gone). With "always" the write and fsync happen before
    the reply, grouped once per event-loop turn; bench/logwriter measures what it costs (docs/performance.md).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        executable: str = "redis-server",
        appendfsync: str = "always",
        maxmemory: str = "1gb",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync={appendfsync!r} must be 'always', 'everysec' or 'no'")
        if not re.fullmatch(r"\d+(?:[kmg]b?)?", maxmemory.strip().lower()):
            raise ValueError(f"maxmemory={maxmemory!r} must be a Redis memory size such as 512mb or 2gb")
        self.data_dir = Path(data_dir).absolute()
        self.executable = executable
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory.strip().lower()
        self.socket_path = self.data_dir / "redis.sock"
        self.pidfile = self.data_dir / "redis.pid"
        self.logfile = self.data_dir / "redis.log"
        self.password_file = self.data_dir / "password"
        self.config_file = self.data_dir / "redis.conf"
        self._password: str | None = None
        self._lockfile = self.data_dir / "start.lock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where the current child's lines start in the log
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise RedisServerError(
                f"redis data_dir {self.data_dir} is too deep: the socket path {self.socket_path} has "
                f"{len(str(self.socket_path))} characters, unix sockets allow {_MAX_SOCKET_PATH}; "
                "use a shorter directory (e.g. set SECONDSTAGE_VAR_DIR)"
            )

    @classmethod
    def for_settings(cls, settings: CommonSettings) -> PrivateRedis:
        """The private server of a deployment: its directory and memory cap from the settings."""
        return cls(settings.redis_dir, maxmemory=settings.redis_maxmemory)

    @property
    def password(self) -> str | None:
        """The server's password (read from `password_file`); None before the first start created it."""
        if self._password is None:
            try:
                self._password = self.password_file.read_text().strip() or None
            except FileNotFoundError:
                return None
        return self._password

    @property
    def url(self) -> str:
        """The URL clients connect with; it carries the password, so never log it."""
        password = self.password
        if password is None:
            return f"unix://{self.socket_path}"
        return f"unix://:{quote(password, safe='')}@{self.socket_path}"

    def _ensure_password(self) -> None:
        """Create the password file (0600) on the first start, and the config file that hands it to redis-server."""
        if self.password is None:
            with contextlib.suppress(FileExistsError):  # O_EXCL: a racing start keeps the first one's password
                fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
        password = self.password
        if password is None:
            raise RedisServerError(f"the private Redis password file {self.password_file} is empty; delete it")
        # Rewritten on every start (the password file is the source); never on the command line.
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{password}"\n')

    @property
    def owned(self) -> bool:
        """True while this object's child process is the server (False when reusing another's)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ping(self) -> bool:
        """True if a server answers PING on the socket (a server still loading its AOF counts as down)."""
        return self._probe() == "up"

    def _client(self) -> redis.Redis:
        # No retries (a probe must answer now) and no CLIENT SETINFO handshake (refused while loading).
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            lib_name=None,
            lib_version=None,
        )

    def _probe(self) -> str:
        """'up', 'loading' (alive, replaying its AOF) or 'down'."""
        if not self.socket_path.exists():
            return "down"
        try:
            with self._client() as c:
                c.ping()
        except redis.BusyLoadingError:  # before ConnectionError: it is one
            return "loading"
        except (redis.RedisError, OSError):
            return "down"
        return "up"

    def _command(self) -> list[str]:
        return [
            self.executable,
            str(self.config_file),  # the password; the rest is on the command line
            "--dir", str(self.data_dir),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            # The AOF is the persistence; RDB snapshots would only add forks.
            "--save", "",
            # Refuse writes at the cap rather than evict: see the module docstring.
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (or attach to one already answering) and wait until it answers PING."""
        if self.owned:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The lock stops serve and align, started together, from launching two servers on one directory.
        with open(self._lockfile, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._probe()
            if state == "loading":
                self._wait_up(timeout, proc=None)
            if state != "down":
                log.info("using the redis-server already running at %s", self.socket_path)
                return
            if shutil.which(self.executable) is None:
                raise RedisServerError(
                    f"{self.executable!r} not found on PATH; install it: apt-get install redis-server "
                    "(or set SECONDSTAGE_REDIS_URL to an existing Redis)"
                )
            self._ensure_password()
            with open(self.logfile, "ab") as out:
                self._log_offset = out.tell()
                # Own session: Ctrl-C on serve must not kill Redis before serve has flushed its log to it.
                self._proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_up(timeout, proc=self._proc)
            except BaseException:
                self.kill()
                raise
        log.info("started redis-server pid %d at %s", self._proc.pid, self.socket_path)

    def _wait_up(self, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with code {proc.returncode} while starting; "
                    f"its log {self.logfile} ends with:\n{self._log_tail()}"
                )
            if self._probe() == "up":
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server at {self.socket_path} did not answer PING within {timeout}s "
                    f"(raise the start timeout if it is loading a large AOF); log tail:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def last_warning(self) -> str | None:
        """The latest child's last warning in its log, e.g. "Bad file format reading the append only file ..."."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(max(self._log_offset, f.seek(0, os.SEEK_END) - 65536))
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        warnings = [
            m.group(1)
            for line in text.splitlines()
            # Every start prints these at warning level: advice about the host (overcommit, THP) and a milestone.
            if (m := _WARNING_LINE.match(line)) and not m.group(1).startswith(("WARNING ", "Server initialized"))
        ]
        return warnings[-1] if warnings else None

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down the child server cleanly (SHUTDOWN flushes the AOF); SIGKILL if it does not exit in time.

        A server this object did not start is left running.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with self._client() as c:
                    c.ping()  # redis-py takes a failed connect during SHUTDOWN for success: connect first
                    c.shutdown()  # returns once the server closed the connection, i.e. is exiting
            except (redis.RedisError, OSError):
                # Socket gone or unusable: SIGTERM asks for the same clean shutdown.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d did not shut down within %ss; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the child server (tests use it to simulate an outage); the AOF brings the data back on start."""
        proc = self._proc
        if proc is None:
            raise RedisServerError(f"no redis-server child to kill at {self.socket_path} (not started by this object)")
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the child to exit: its exit status, or None while it runs.

        Negative statuses are signals (-9: SIGKILL). Once it has exited the child is forgotten
        (`owned` is False) and `start()` starts a new one on the same directory.
        """
        proc = self._proc
        if proc is None:
            raise RedisServerError(
                f"no redis-server child to wait for at {self.socket_path} (not started by this object)"
            )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._proc = None
        return code

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the child if it runs, then start a new one on the same directory (data comes back from the AOF)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def supervisor_holder(data_dir: Path | str) -> str | None:
    """Who supervises the private server in `data_dir` ("pid 1234"), or None when no process does.

    `secondstage serve` holds an exclusive flock on `<data_dir>/supervisor.lock` for its lifetime
    (see `core.redis_supervisor`); the lock dies with the process, so a crashed serve leaves none behind.
    """
    try:
        fd = os.open(Path(data_dir) / SUPERVISOR_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return f"pid {pid}" if pid.isdigit() else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def resolve_redis(settings: CommonSettings) -> tuple[str, PrivateRedis | None]:
    """The Redis URL to use, and the private server to stop on exit when this call started one.

    A configured `redis_url` wins. Otherwise the private server under `settings.redis_dir`:
    reused if it already answers (another deployable started it), started here if not. While
    `secondstage serve` supervises that directory its server is the only one: if it is down (serve
    is restarting it), wait up to `settings.redis_wait_s` for it instead of starting a second one,
    then fail naming the directory.
    """
    if settings.redis_url:
        return settings.redis_url, None
    server = PrivateRedis.for_settings(settings)
    if not server.ping() and (holder := supervisor_holder(server.data_dir)) is not None:
        _wait_for_supervised(server, holder, settings.redis_wait_s)
    server.start()
    return server.url, (server if server.owned else None)


def _wait_for_supervised(server: PrivateRedis, holder: str, wait_s: float) -> None:
    """Wait for the server a running serve supervises; return early if that serve exits (then start our own)."""
    log.warning(
        "the private Redis in %s is down; secondstage serve (%s) supervises it and is restarting it: "
        "waiting up to %.0fs",
        server.data_dir, holder, wait_s,
    )  # fmt: skip
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.ping() or supervisor_holder(server.data_dir) is None:
            return
        time.sleep(0.1)
    raise RedisServerError(
        f"the private Redis in {server.data_dir} did not come back within {wait_s:.0f}s: secondstage serve "
        f"({holder}) supervises it and is still restarting it, so this command will not start a second "
        f"redis-server on that directory. See serve's GET /health for the reason and {server.logfile}; "
        "run again once it is back, or set SECONDSTAGE_REDIS_WAIT_S to wait longer"
    )
