"""The HTTP front's lifecycle: uvicorn in the coordinator's own event loop, beside grpc.aio.

Requests reach the coordinator's gRPC server over a unix socket in a private folder, so the HTTP
front is one more gRPC client with the same limits (--max-sessions), the same bearer token
(the Authorization header is passed on), deadlines (the body's `timeout`) and trace context
(traceparent, tracestate). TLS and mutual TLS take the coordinator's --tls-* files. Why FastAPI,
uvicorn and pydantic rather than a hand-written server: docs/design.md section 14.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import tempfile
from pathlib import Path

import grpc
import uvicorn

from coordinator.openai_http.routes import Front, build_app
from protos.v1 import pearl_pb2_grpc
from specdec.security import ServerTLS
from specdec.serving import CHANNEL_OPTIONS, Server

log = logging.getLogger("pearl.http")


class _Embedded(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the coordinator's own handlers stop everything (serving.py)
        yield


class CountRequests:
    """ASGI middleware: Prometheus counts HTTP requests by route and status (a plain ASGI
    wrapper, not BaseHTTPMiddleware, which would get between a stream and its cancellation)."""

    def __init__(self, app, telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics = self.telemetry().metrics
            if metrics is not None:
                route = scope.get("route")
                metrics.http_requests.add(1, {"route": route.path if route else "unmatched",
                                              "method": scope["method"], "status": str(status)})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; `[::]` / `::` listens on IPv6 and IPv4 alike, as gRPC's does."""
    host = host.strip("[]")
    if ":" in host:
        sock = socket.create_server((host, port), family=socket.AF_INET6,
                                    dualstack_ipv6=host == "::")
    else:
        sock = socket.create_server((host, port))
    # Accepted sockets inherit it. asyncio sets it itself only on sockets made with proto TCP,
    # which create_server's are not: without it, Nagle held a kept-alive connection's first
    # chunks ~40 ms (time to first token 0.060 s vs 0.016 s on gRPC, tiny models).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class HttpFront:
    def __init__(self, servicer, server: Server, port: int, host: str = "0.0.0.0",
                 tls: ServerTLS | None = None, auth_token: str | None = None):
        self.servicer, self.server, self.host, self.tls = servicer, server, host, tls
        self.port, self.auth_token = port, auth_token
        self.folder = Path(tempfile.mkdtemp(prefix="pearl-http-"))  # 0700: this process only
        self.socket = f"unix:{self.folder / 'coordinator.sock'}"
        if server.grpc.add_insecure_port(self.socket) == 0:
            raise OSError(f"cannot bind {self.socket}")
        self.channel: grpc.aio.Channel | None = None
        self.uvicorn: _Embedded | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        """Serve HTTP (after the gRPC server started); the bound port."""
        self.channel = grpc.aio.insecure_channel(self.socket, options=CHANNEL_OPTIONS)
        stub = pearl_pb2_grpc.CoordinatorStub(self.channel)
        guard = self.server.guard
        front = Front(self.servicer, stub, self.auth_token,
                      serving=lambda: not (guard.draining or guard.warming))
        app = CountRequests(build_app(front), lambda: self.servicer.telemetry)
        ssl_kw = {}
        if self.tls is not None:
            ssl_kw = {"ssl_certfile": self.tls.cert, "ssl_keyfile": self.tls.key}
            if self.tls.ca:  # mutual TLS, as on the gRPC port
                ssl_kw.update(ssl_ca_certs=self.tls.ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, host=self.host, port=self.port, lifespan="off",
                                log_level="warning", access_log=False, timeout_keep_alive=30,
                                **ssl_kw)
        sock = bind(self.host, self.port)  # here, so that a taken port raises OSError here
        self.port = sock.getsockname()[1]
        self.uvicorn = _Embedded(config)
        self.task = asyncio.ensure_future(self.uvicorn.serve(sockets=[sock]))
        while not self.uvicorn.started:
            if self.task.done():
                self.task.result()
                raise OSError(f"the HTTP front did not start on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        log.info("HTTP (OpenAI-compatible) on port %d", self.port)
        return self.port

    async def stop(self) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
            self.uvicorn.force_exit = True  # open streams were cut when the gRPC calls ended
            await asyncio.wait({self.task}, timeout=10)
        if self.channel is not None:
            await self.channel.close()
        shutil.rmtree(self.folder, ignore_errors=True)
