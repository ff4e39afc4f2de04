"""Plumbing the three gRPC servers share: one way to build and start a server (health,
reflection, load reports, the session guard, the error interceptor), the session workers off
the event loop, channel options and clean shutdown. No servicer lives here."""

import asyncio
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.interceptor import ErrorStatus, Status
from specdec.limits import CallGuard, LoadReporter
from specdec.security import ServerTLS
from specdec.telemetry import Telemetry

T = TypeVar("T")

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a tokenizer.json (~7 MB for Qwen) fits in ModelInfo
_MESSAGE_SIZES = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# One keepalive policy for both ends of every connection (clients: CHANNEL_OPTIONS, servers:
# SERVER_OPTIONS). PEARL_KEEPALIVE_S shortens it for tests; the same value must reach every
# process, or a client may ping more often than its server allows.
KEEPALIVE_S = float(os.environ.get("PEARL_KEEPALIVE_S", 30))
KEEPALIVE_TIMEOUT_S = 20.0  # a peer that does not answer a ping this long is dead


def keepalive_options(period_s: float) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(client, server) channel arguments of one policy: both ends ping every ``period_s``, also
    while idle and through a call on which nothing flows (a long prefill); a server accepts a
    peer's pings down to half that period, so timer jitter never counts as abuse.

    gRPC's defaults do not fit a 30 s client ping: a server counts pings more frequent than one
    per 5 minutes on a connection that sends no data as strikes and answers the third with
    GOAWAY ``too_many_pings``, which ends every stream on the connection; and a client stops
    pinging after two pings without data, so a long silent call was not watched at all."""
    ms = max(1, int(period_s * 1000))
    both = [("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1)]
    client = [*both, ("grpc.http2.max_pings_without_data", 0)]
    server = [*both, ("grpc.http2.min_ping_interval_without_data_ms", max(1, ms // 2)),
              ("grpc.http2.max_ping_strikes", 2)]
    return client, server


_CLIENT_KEEPALIVE, _SERVER_KEEPALIVE = keepalive_options(KEEPALIVE_S)
CHANNEL_OPTIONS = [*_MESSAGE_SIZES, *_CLIENT_KEEPALIVE]
SERVER_OPTIONS = [*_MESSAGE_SIZES, *_SERVER_KEEPALIVE]


class SessionWorkers:
    """Threads that run session calls (which wait on the model's engine) off the event loop.

    One worker per concurrent session at most: each call blocks its worker until the engine
    (specdec/engine.py) has run the step that holds its forward, so the pool must be as wide as
    the sessions that may wait at once, or one session's wait would hold back another's.
    """

    def __init__(self, name: str, workers: int = 1):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                       thread_name_prefix=f"{name}-session")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ModelServicer:
    """What the draft and target servicers share: the loaded model, its engine (one batched
    forward per step over every session's work, specdec/engine.py) reporting to the service's
    telemetry, the session workers, the count of live sessions, and ``close``."""

    telemetry = Telemetry.off()  # traces and metrics (specdec/telemetry.py), unless given

    def __init__(self, loaded: Any, role: str, engine: Any, max_sessions: int, idle_s: float,
                 telemetry: Telemetry | None = None):
        from specdec.engine import Engine

        self.loaded = loaded
        if telemetry is not None:
            self.telemetry = telemetry
        self.idle_s = idle_s  # a session that hears nothing this long is closed (0: never)
        self.engine = Engine.configured(loaded.model, engine, role)
        self.engine.on_step = lambda *step: self.telemetry.engine_step(*step)  # batch metrics
        self.engine.on_wait = lambda ns: self.telemetry.engine_wait(ns)
        self.engine.on_prefix = lambda hit, looked: self.telemetry.prefix_lookup(hit, looked)
        self.runner = SessionWorkers(role, max_sessions or 256)
        self.live = 0

    async def close(self) -> None:
        """Stop the session workers and the engine (after the server has drained)."""
        self.runner.close()
        self.engine.close()


class Server:
    """An aio gRPC server with the standard health service, server reflection, load reports
    (GetLoad), the session guard and the error interceptor (specdec/interceptor.py)."""

    def __init__(self, service_names: list[str], interceptors: list | tuple = (),
                 label: str = "service", max_sessions: int = 0, store: Any = None,
                 statuses: dict[type[BaseException], Status] | None = None):
        # Counts and bounds the sessions (streaming calls) and refuses new ones while draining.
        self.guard = CallGuard(service_names, label, max_sessions)
        # Innermost, ErrorStatus reads the request messages and maps exceptions to statuses.
        self.grpc = grpc.aio.server(
            options=SERVER_OPTIONS,
            interceptors=[*interceptors, self.guard, ErrorStatus(statuses)])
        self.health = health.aio.HealthServicer()
        self.service_names = service_names
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        from protos.v1 import pearl_pb2, pearl_pb2_grpc  # GetLoad: coordinator/replicas.py

        pearl_pb2_grpc.add_LoadReportServicer_to_server(LoadReporter(self.guard, store), self.grpc)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             pearl_pb2.DESCRIPTOR.services_by_name["LoadReport"].full_name,
             reflection.SERVICE_NAME], self.grpc)
        self.port = 0

    @classmethod
    def serving(cls, servicer: Any, service: str, *, label: str, max_sessions: int,
                statuses: dict[type[BaseException], Status], store: Any = None,
                interceptors: list | tuple = ()) -> "Server":
        """A server for ``servicer``, the implementation of pearl.v1 ``service`` (e.g.
        "DraftService"); started with ``start``."""
        from protos.v1 import pearl_pb2, pearl_pb2_grpc

        server = cls([pearl_pb2.DESCRIPTOR.services_by_name[service].full_name], interceptors,
                     label, max_sessions, store, statuses)
        getattr(pearl_pb2_grpc, f"add_{service}Servicer_to_server")(servicer, server.grpc)
        return server

    async def start(self, port: int, host: str = "[::]", tls: ServerTLS | None = None,
                    warm_up: Callable[[], Any] | None = None) -> int:
        """Bind and serve. With ``warm_up`` (an engine's compiled-step warm-up), the port opens
        first with health NOT_SERVING and sessions refused (UNAVAILABLE), so that probes see a
        live process that is not ready; ``warm_up`` runs off the event loop, then SERVING."""
        if tls is None:
            self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        else:  # TLS, or mutual TLS when the certificates require client certificates
            self.port = self.grpc.add_secure_port(f"{host}:{port}", tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await self.grpc.start()
        if warm_up is not None:
            self.guard.warming = True
            await self.set_serving(False)
            try:
                await asyncio.to_thread(warm_up)
            finally:
                self.guard.warming = False
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING first, then drain in-flight calls for up to ``grace_s``.

        While draining, health answers NOT_SERVING and new sessions are refused (UNAVAILABLE);
        the sessions in flight run on until they end or the grace period is over."""
        await self.set_serving(False)
        self.guard.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.guard.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc.stop(max(0.0, deadline - loop.time()))

    async def serve_until_signal(self, grace_s: float = 5.0) -> None:
        """Block until SIGINT/SIGTERM, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop(grace_s)


def wait_healthy(address: str, timeout_s: float) -> None:
    """Block until ``address`` answers SERVING on the health service (synchronous)."""
    import time

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.2)


def model_info(loaded: Any, live_sessions: int, engine: Any = None) -> Any:
    """ModelInfoResponse for a loaded model (see specdec.models.LoadedModel) and its engine."""
    from protos.v1 import pearl_pb2

    model, tok = loaded.model, loaded.tokenizer
    return pearl_pb2.ModelInfoResponse(
        model=loaded.name,
        vocab_size=model.config.vocab_size,
        eos_token_ids=eos_token_ids(model),
        max_positions=model.config.max_position_embeddings,
        tokenizer_json=tok.backend_tokenizer.to_str(),
        chat_template=getattr(tok, "chat_template", None) or "",
        device=loaded.device.type,
        dtype=str(loaded.dtype).removeprefix("torch."),
        live_sessions=live_sessions,
        **(engine_info(engine) if engine is not None else {}),
    )


def engine_info(engine: Any) -> dict:
    """The ModelInfoResponse fields that describe a specdec.engine.Engine."""
    store = engine.store
    return dict(engine="batched" if engine.batched else "transformers",
                kv_cache_tokens=store.tokens if store else 0,
                kv_free_tokens=store.free_tokens if store else 0,
                kv_bytes_per_token=engine.kv_bytes_per_token,
                max_batch_tokens=engine.max_batch_tokens, compiled=engine.compiled,
                **(kv_cache_info(store) if store else {}))


def kv_cache_info(store: Any) -> dict:
    """The prefix cache's fields of ModelInfoResponse (specdec/kv_store.py)."""
    return dict(prefix_cache=store.prefix_cache, kv_cached_tokens=store.cached_tokens,
                prefix_hit_tokens=store.hit_tokens, prefix_lookup_tokens=store.lookup_tokens)


def eos_token_ids(model: Any) -> list[int]:
    """The ids that end generation, as transformers' ``generate`` uses them."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
