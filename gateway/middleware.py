"""Per-request context as plain ASGI (no per-request task or body buffering): org from the host
name, a request id (in every log record and SQL statement of the request), request metrics."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.logs import log_context
from gateway.metrics import METRICS

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # safe in logs and in an SQL comment

NOT_ORG_PATHS = ("/orgs/", "/admin/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi")


class RequestContext:
    """``<org>.<domain>/x`` is served as ``/orgs/<org>/x``; every response carries
    ``x-request-id`` (the client's or a new one), which error handlers and logs quote."""

    def __init__(self, app: ASGIApp, host_org: re.Pattern[str] | None = None) -> None:
        self.app = app
        self.host_org = host_org

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        if self.host_org is not None and not path.startswith(NOT_ORG_PATHS):
            match = self.host_org.match(headers.get("host", ""))
            if match:
                scope["path"] = f"/orgs/{match.group(1)}{path}"
                scope["raw_path"] = scope["path"].encode()
        offered = headers.get("x-request-id", "")
        request_id = offered if REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            with log_context(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            route: Any = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            METRICS.requests.labels(endpoint, str(status)).inc()
            METRICS.latency.labels(endpoint).observe(time.perf_counter() - started)


__all__ = ["RequestContext"]
