"""Who may do what: API keys in Redis, their scopes, and the operator surface.

- `store.py` — `KeyStore`: keys in one Redis hash shared by every replica (only a hash of the secret);
  used by the server and by `secondstage keys`;
- `authenticator.py` — `Authenticator`: a request's Bearer key -> `Caller`, cached briefly in-process;
  the anonymous (open) mode and the scope check;
- `credential.py` — the local admin credential (`var/admin.key`, generated on first start);
- `surface.py` — the operator port (`SECONDSTAGE_ADMIN_PORT`): which paths each port serves;
- `cli.py` — `secondstage keys create | list | revoke`.

docs/security.md describes the model.
"""

from serve.auth.authenticator import Authenticator, is_loopback
from serve.auth.store import ApiKey, KeyStore

__all__ = ["ApiKey", "Authenticator", "KeyStore", "is_loopback"]
