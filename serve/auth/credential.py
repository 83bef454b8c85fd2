"""The local admin credential: an admin key serve generates into `var/admin.key` (mode 0600) on first start.

Admin routes always need an admin key, even in the anonymous local mode, so a fresh checkout gets one
without an extra command: whoever can read the server's var/ directory is its operator. Only the key's
hash goes to the store (as a `local_admin` entry, which does not close the anonymous mode). The file is
reused on later starts and registered again if the store lost it (a fresh Redis). Rotate it by deleting
the file and restarting, or revoke it with `secondstage keys revoke ID`.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

from serve.auth.store import KeyStore, new_secret
from serve.caller import key_id_of

logger = logging.getLogger("secondstage.auth")

NAME = "local-admin"


async def ensure_admin_credential(store: KeyStore, path: Path) -> str:
    """Create (or reuse) the admin key in `path` and make sure the store knows it; returns its key id."""
    secret = None if path.is_file() else _create(path)
    if secret is None:  # it existed, or another replica on the same var/ created it a moment ago
        secret = _read(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning("%s is readable by others (mode %o); `chmod 600 %s`", path, mode, path)
    key_id = key_id_of(secret)
    entry = await store.get(key_id)
    if entry is None:
        await store.add(secret, NAME, ["admin"], local_admin=True)
    elif entry.revoked:
        logger.warning(
            "the admin key in %s (%s) is revoked; delete the file and restart serve to get a new one", path, key_id
        )
    logger.info("admin key (for /admin/*) in %s: send `Authorization: Bearer $(cat %s)`", path, path)
    return key_id


def _create(path: Path) -> str | None:
    """Write a new secret to `path`; None when the file already exists (a replica starting beside us won)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    try:
        # O_EXCL with the mode at creation: the secret is never in a file anyone else could open.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def _read(path: Path, timeout_s: float = 5.0) -> str:
    """The secret in `path`, waiting briefly while the replica that created it is still writing it."""
    deadline = time.monotonic() + timeout_s
    while True:
        secret = path.read_text().strip()
        if secret or time.monotonic() > deadline:
            return secret
        time.sleep(0.05)
