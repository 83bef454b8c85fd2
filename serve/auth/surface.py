"""The operator surface: with `SECONDSTAGE_ADMIN_PORT`, /admin/* and /metrics only on that port.

One app serves both ports (a second uvicorn server in the same process, started in the app's lifespan
once the engine and services exist, sharing them): `SurfaceGuard` tells the ports apart by the local
port the request came in on (ASGI `scope["server"]`) and answers 404 for an operator path on the public
port and for a public path on the operator port, as if the route did not exist there. One app rather
than a second one built by the factory: there is one lifespan, one engine, one set of services and
metrics, and nothing to keep in step. deploy/ can then publish only the public port in its Service.
`/health` and `/health/ready` answer on both (probes may use either).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_body

logger = logging.getLogger("secondstage.auth")

OPERATOR_PREFIXES = ("/admin/", "/metrics")
BOTH = ("/health",)


def is_operator_path(path: str) -> bool:
    return path == "/admin" or path.startswith(OPERATOR_PREFIXES)


class SurfaceGuard:
    """ASGI middleware: which paths each port serves (the public one, and `admin_port`)."""

    def __init__(self, app: ASGIApp, *, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            server = scope.get("server")
            on_admin = server is not None and server[1] == self.admin_port
            if not path.startswith(BOTH) and is_operator_path(path) != on_admin:
                where = "the operator port" if not on_admin else "the public port"
                body = error_body(HTTPStatus.NOT_FOUND, "NotFoundError", f"{path} is served on {where} only")
                await JSONResponse(body, status_code=HTTPStatus.NOT_FOUND)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OperatorServer:
    """A second uvicorn server on the admin port, over the same app, inside the main server's event loop."""

    def __init__(self, app: Any, host: str, port: int, log_level: str = "info") -> None:
        import uvicorn

        # lifespan off: the app's lifespan already runs under the main server and built what we share.
        # log_config None: keep the logging serve configured (serve/logs.py), not reset uvicorn's defaults.
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_level=log_level, log_config=None)
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Not `Server.serve()`: that installs signal handlers, which belong to the main server.
        config = self.server.config
        if not config.loaded:
            config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup()  # binds now: a port in use fails serve's start
        self._task = asyncio.create_task(self.server.main_loop(), name="operator-server")
        logger.info("operator surface (/admin/*, /metrics) on %s:%d", config.host, config.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
        await self.server.shutdown()
