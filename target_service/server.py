"""The TargetService servicer: a thin adapter from the Verify stream to TargetSession objects."""

import logging

import grpc

from protos.v1 import pearl_pb2, pearl_pb2_grpc
from specdec.answers import Verdict
from specdec.defaults import (
    DEFAULT_IDLE_S,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_TREE_NODES,
)
from specdec.engine import EngineConfig, describe_engine
from specdec.interceptor import Status
from specdec.kv_store import StoreFull
from specdec.limits import idle_limited
from specdec.security import ServerTLS
from specdec.serving import ModelServicer, Server, model_info
from specdec.telemetry import Telemetry
from specdec.wire import dist_from_pb, sampling_from_pb, verdict_to_pb
from target_service.hidden_transfer.layers import Transfer
from target_service.hidden_transfer.session import HiddenTransferSession
from target_service.hidden_transfer.tree import chain_paths, tree_paths
from target_service.tracing import NO_TARGET_TRACE, target_trace
from target_service.verifier import ProtocolError, TargetSession

log = logging.getLogger("pearl.target")


def to_pb(v: Verdict, window_id: int, phase: str) -> pearl_pb2.VerifyResponse:
    return pearl_pb2.VerifyResponse(result=verdict_to_pb(v, window_id, phase))


class Unavailable(Exception):
    """A session this service cannot run (answered with FAILED_PRECONDITION)."""


# what a Verify stream's errors answer (specdec/interceptor.py)
STATUSES: dict[type[BaseException], Status] = {
    ProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.FAILED_PRECONDITION,
    StoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TargetServicer(ModelServicer, pearl_pb2_grpc.TargetServiceServicer):
    def __init__(self, loaded, transfer: Transfer | None = None,
                 tree_nodes: int = DEFAULT_TREE_NODES,
                 engine: EngineConfig = EngineConfig(),
                 max_sessions: int = DEFAULT_MAX_SESSIONS, idle_s: float = DEFAULT_IDLE_S,
                 telemetry: Telemetry | None = None):
        super().__init__(loaded, "target", engine, max_sessions, idle_s, telemetry)
        self.transfer = transfer
        if transfer is not None:
            transfer.layers.to(loaded.device, loaded.dtype)
            k = transfer.layers.k
            self.paths = (tree_paths(transfer.rank_acceptance, tree_nodes, k)
                          if transfer.rank_acceptance else chain_paths(k)[:tree_nodes])

    def describe_transfer(self) -> str:
        if self.transfer is None:
            return ""
        t = self.transfer.layers
        return f"layer {t.layer}, k {t.k}, rank {t.rank}, {len(self.paths)} tree nodes"

    async def GetModelInfo(self, request, context):
        info = model_info(self.loaded, self.live, self.engine)
        info.hidden_transfer = self.describe_transfer()
        return info

    def open(self, start: pearl_pb2.VerifyStart) -> TargetSession | HiddenTransferSession:
        try:
            sampling = sampling_from_pb(start.sampling)
        except ValueError as e:
            raise ProtocolError(f"start.sampling: {e}") from None
        if start.top_logprobs and not start.logprobs:
            raise ProtocolError("start.top_logprobs needs start.logprobs")
        logprobs = start.top_logprobs if start.logprobs else None
        model, prompt = self.loaded.model, list(start.prompt_ids)
        max_positions = model.config.max_position_embeddings
        if start.hidden_transfer:
            if self.transfer is None:
                raise Unavailable("start.hidden_transfer: this target service has no transfer "
                                  "layers (pearl transfer train, then serve with --transfer)")
            return HiddenTransferSession(self.engine, self.transfer.layers, self.paths, prompt,
                                         max_positions, sampling, logprobs)
        return TargetSession(self.engine, prompt, max_positions, sampling, logprobs)

    async def verify(self, session, w: pearl_pb2.VerifyWindow) -> Verdict:
        vocab = self.loaded.model.config.vocab_size
        try:
            qs = [dist_from_pb(q, vocab) for q in w.q]
        except ValueError as e:
            raise ProtocolError(f"window.q: {e}") from None
        try:
            return await self.runner.run(session.verify, w.position, list(w.draft_ids), qs,
                                         w.bonus, w.held)
        except ValueError as e:  # e.g. a draft token outside its q
            raise ProtocolError(f"window: {e}") from None

    async def Verify(self, request_iterator, context):
        session: TargetSession | None = None
        ttrace = NO_TARGET_TRACE  # this stream's target.verify spans and metrics, once started
        self.live += 1
        try:
            async for req in idle_limited(request_iterator, self.idle_s, context, "target"):
                kind = req.WhichOneof("kind")
                if kind == "start":
                    if session is not None:
                        raise ProtocolError("start sent twice on one stream")
                    session = self.open(req.start)
                    ttrace = target_trace(self.telemetry, req.start)
                    verdict = await self.runner.run(session.start, req.start.first_token)
                    ttrace.verdict(verdict, 0, "start")
                    yield to_pb(verdict, 0, "start")
                elif kind == "window":
                    if session is None:
                        raise ProtocolError("window before start")
                    verdict = await self.verify(session, req.window)
                    ttrace.verdict(verdict, req.window.window_id, req.window.phase)
                    yield to_pb(verdict, req.window.window_id, req.window.phase)
                elif kind == "stop":
                    return
                else:
                    raise ProtocolError("empty VerifyRequest")
        finally:
            ttrace.close()
            if session is not None:
                session.close()
            self.live -= 1


async def serve(loaded, port: int, host: str = "[::]", tls: ServerTLS | None = None,
                max_sessions: int = DEFAULT_MAX_SESSIONS, idle_s: float = DEFAULT_IDLE_S,
                transfer: Transfer | None = None, tree_nodes: int = DEFAULT_TREE_NODES,
                engine: EngineConfig = EngineConfig(), telemetry: Telemetry | None = None
                ) -> tuple[Server, TargetServicer]:
    servicer = TargetServicer(loaded, transfer, tree_nodes, engine, max_sessions, idle_s,
                              telemetry)
    server = Server.serving(servicer, "TargetService", label="target service",
                            max_sessions=max_sessions, statuses=STATUSES,
                            store=servicer.engine.store)
    # the port opens NOT_SERVING; SERVING once the compiled steps are built (if any)
    await server.start(port, host, tls, warm_up=servicer.engine.serving_warm_up())
    log.info("target service on port %d (%s; %s%s)", server.port, loaded.name,
             describe_engine(servicer.engine),
             f"; hidden transfer: {servicer.describe_transfer()}" if transfer else "")
    return server, servicer
