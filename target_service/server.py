"""The TargetService servicer: a thin adapter from the Verify stream to TargetSession objects."""

import logging

import grpc

from protos.v1 import pearl_pb2, pearl_pb2_grpc
from specdec.defaults import (
    DEFAULT_IDLE_S,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_TREE_NODES,
)
from specdec.engine import Engine, EngineConfig, describe_engine
from specdec.kv_store import StoreFull
from specdec.limits import idle_limited
from specdec.security import ServerTLS
from specdec.serving import ModelRunner, Server, model_info
from specdec.telemetry import Telemetry
from specdec.wire import dist_from_pb, logprob_to_pb, sampling_from_pb
from target_service.hidden_transfer.layers import Transfer
from target_service.hidden_transfer.session import HiddenTransferSession
from target_service.hidden_transfer.tree import chain_paths, tree_paths
from target_service.tracing import NO_TARGET_TRACE, target_trace
from target_service.verifier import ProtocolError, TargetSession, Verdict

log = logging.getLogger("pearl.target")


def to_pb(v: Verdict, window_id: int, phase: str) -> pearl_pb2.VerifyResponse:
    return pearl_pb2.VerifyResponse(result=pearl_pb2.VerifyResult(
        position=v.position, verified=v.verified, accepted=v.accepted,
        token_id=v.token_id if v.token_id is not None else 0, has_token=v.token_id is not None,
        committed=v.committed, forward_ns=v.forward_ns, started_unix_ns=v.started_unix_ns,
        window_id=window_id, phase=phase, input_tokens=v.input_tokens,
        accepted_ids=v.accepted_ids, batch_rows=v.batch_rows, batch_tokens=v.batch_tokens,
        queue_ns=v.queue_ns, logprobs=[logprob_to_pb(t) for t in v.logprobs],
        cached_tokens=v.cached_tokens))


class Unavailable(Exception):
    """A session this service cannot run (answered with FAILED_PRECONDITION)."""


class TargetServicer(pearl_pb2_grpc.TargetServiceServicer):
    telemetry = Telemetry.off()  # traces and metrics; `pearl serve` and tests set their own
    idle_s = DEFAULT_IDLE_S  # a session that hears nothing this long is closed (0: never)

    def __init__(self, loaded, transfer: Transfer | None = None,
                 tree_nodes: int = DEFAULT_TREE_NODES,
                 engine: EngineConfig = EngineConfig(),
                 max_sessions: int = DEFAULT_MAX_SESSIONS):
        self.loaded = loaded
        # one batched forward per step over every session's work (specdec/engine.py)
        self.engine = Engine.configured(loaded.model, engine, "target")
        self.engine.on_step = lambda *step: self.telemetry.engine_step(*step)  # batch metrics
        self.engine.on_wait = lambda ns: self.telemetry.engine_wait(ns)
        self.engine.on_prefix = lambda hit, looked: self.telemetry.prefix_lookup(hit, looked)
        self.runner = ModelRunner("target", max_sessions or 256)
        self.live = 0
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

    async def close(self) -> None:
        """Stop the session workers and the engine (after the server has drained)."""
        self.runner.close()
        self.engine.close()

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

    async def Verify(self, request_iterator, context):
        session: TargetSession | None = None
        ttrace = NO_TARGET_TRACE  # this stream's target.verify spans and metrics, once started
        self.live += 1
        try:
            async for req in idle_limited(request_iterator, self.idle_s, context, "target"):
                kind = req.WhichOneof("kind")
                try:
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
                        w = req.window
                        vocab = self.loaded.model.config.vocab_size
                        try:
                            qs = [dist_from_pb(q, vocab) for q in w.q]
                        except ValueError as e:
                            raise ProtocolError(f"window.q: {e}") from None
                        verdict = await self.runner.run(session.verify, w.position,
                                                        list(w.draft_ids), qs, w.bonus, w.held)
                        ttrace.verdict(verdict, w.window_id, w.phase)
                        yield to_pb(verdict, w.window_id, w.phase)
                    elif kind == "stop":
                        return
                    else:
                        raise ProtocolError("empty VerifyRequest")
                except ProtocolError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except Unavailable as e:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
                except StoreFull as e:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
                except ValueError as e:  # e.g. a draft token outside its q
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"window: {e}")
        finally:
            ttrace.close()
            if session is not None:
                session.close()
            self.live -= 1


async def serve(loaded, port: int, host: str = "[::]", tls: ServerTLS | None = None,
                max_sessions: int = DEFAULT_MAX_SESSIONS, idle_s: float = DEFAULT_IDLE_S,
                transfer: Transfer | None = None, tree_nodes: int = DEFAULT_TREE_NODES,
                engine: EngineConfig = EngineConfig()
                ) -> tuple[Server, TargetServicer]:
    servicer = TargetServicer(loaded, transfer, tree_nodes, engine, max_sessions)
    servicer.idle_s = idle_s
    server = Server([pearl_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name],
                    label="target service", max_sessions=max_sessions,
                    store=servicer.engine.store)
    pearl_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server.grpc)
    # the port opens NOT_SERVING; SERVING once the compiled steps are built (if any)
    await server.start(port, host, tls.credentials() if tls else None,
                       warm_up=servicer.engine.serving_warm_up())
    log.info("target service on port %d (%s; %s%s)", server.port, loaded.name,
             describe_engine(servicer.engine), f"; hidden transfer: {servicer.describe_transfer()}" if transfer else "")
    return server, servicer
