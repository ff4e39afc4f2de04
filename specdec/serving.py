"""Plumbing the three gRPC servers share: health, reflection, a model runner off the event loop,
channel options and clean shutdown. No servicer lives here."""

import asyncio
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.limits import CallGuard

T = TypeVar("T")

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a tokenizer.json (~7 MB for Qwen) fits in ModelInfo
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


class ModelRunner:
    """Runs forward passes on one worker thread so streams stay responsive; one per model."""

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Server:
    """An aio gRPC server with the standard health service and server reflection."""

    def __init__(self, service_names: list[str], interceptors: list | tuple = (),
                 label: str = "service", max_sessions: int = 0):
        # Counts and bounds the sessions (streaming calls) and refuses new ones while draining.
        self.guard = CallGuard(service_names, label, max_sessions)
        self.grpc = grpc.aio.server(options=CHANNEL_OPTIONS,
                                    interceptors=[*interceptors, self.guard])
        self.health = health.aio.HealthServicer()
        self.service_names = service_names
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.grpc)
        self.port = 0

    async def start(self, port: int, host: str = "[::]",
                    credentials: grpc.ServerCredentials | None = None) -> int:
        if credentials is None:
            self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        else:  # TLS, or mutual TLS when the credentials require client certificates
            self.port = self.grpc.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await self.grpc.start()
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


def model_info(loaded: Any, live_sessions: int) -> Any:
    """ModelInfoResponse for a loaded model (see specdec.models.LoadedModel)."""
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
    )


def eos_token_ids(model: Any) -> list[int]:
    """The ids that end generation, as transformers' ``generate`` uses them."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
