"""The DraftService servicer: a thin adapter from the Draft stream to DraftSession objects."""

import asyncio
import logging
import threading

import grpc

from draft_service.drafter import DraftSession, ProtocolError
from draft_service.replay import Replay
from draft_service.tracing import NO_DRAFT_TRACE, draft_trace
from protos.v1 import pearl_pb2, pearl_pb2_grpc
from specdec.answers import Proposal
from specdec.defaults import DEFAULT_IDLE_S, DEFAULT_MAX_SESSIONS
from specdec.engine import EngineConfig, describe_engine
from specdec.interceptor import Status
from specdec.kv_store import StoreFull
from specdec.limits import idle_get
from specdec.security import ServerTLS
from specdec.sequence import Aborted
from specdec.serving import ModelServicer, Server, model_info
from specdec.telemetry import Telemetry
from specdec.wire import proposal_to_pb, sampling_from_pb

log = logging.getLogger("pearl.draft")

# what a Draft stream's errors answer (specdec/interceptor.py)
STATUSES: dict[type[BaseException], Status] = {
    ProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    StoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def to_pb(p: Proposal) -> pearl_pb2.DraftResponse:
    return pearl_pb2.DraftResponse(proposal=proposal_to_pb(p))


class DraftServicer(ModelServicer, pearl_pb2_grpc.DraftServiceServicer):
    def __init__(self, loaded, q_tail: float = 1e-4, replay: Replay | None = None,
                 engine: EngineConfig = EngineConfig(),
                 max_sessions: int = DEFAULT_MAX_SESSIONS, idle_s: float = DEFAULT_IDLE_S,
                 telemetry: Telemetry | None = None):
        super().__init__(loaded, "draft", engine, max_sessions, idle_s, telemetry)
        self.q_tail = q_tail
        self.replay = replay  # a benchmarking draft (draft_service/replay.py), normally None
        self.aborted = 0  # draft forwards stopped early because their token went stale

    async def GetModelInfo(self, request, context):
        return model_info(self.loaded, self.live, self.engine)

    async def Draft(self, request_iterator, context):
        inbox: asyncio.Queue = asyncio.Queue()
        # Set when a message arrives that makes the token being drafted stale (rollback, stop,
        # end of stream): the forward in flight stops at its next decoder layer.
        abort = threading.Event()

        async def pump():
            try:
                async for req in request_iterator:
                    if req.WhichOneof("kind") in ("rollback", "stop"):
                        abort.set()
                    await inbox.put(req)
            finally:
                abort.set()
                await inbox.put(None)

        pump_task = asyncio.create_task(pump())
        session: DraftSession | None = None
        dtrace = NO_DRAFT_TRACE  # this stream's draft.window spans and metrics, once started
        self.live += 1
        try:
            while True:
                # Apply every control message that has arrived; block only when idle.
                while True:
                    if session is not None and session.wants_token:
                        if inbox.empty():
                            break
                        req = inbox.get_nowait()
                    else:  # nothing to draft: wait, but not forever
                        req = await idle_get(inbox, self.idle_s, context, "draft")
                    if req is None or req.WhichOneof("kind") == "stop":
                        return
                    session = self.apply(session, req)
                    if req.WhichOneof("kind") == "start":
                        dtrace = draft_trace(self.telemetry, req.start)
                    else:
                        dtrace.request(req)
                # The inbox is empty here and nothing ran since it was checked (no await): every
                # message that sets ``abort`` from now on is one the step has not seen.
                abort.clear()
                try:
                    proposal = await self.runner.run(session.step, abort)
                except Aborted:  # a rollback or stop is waiting in the inbox
                    self.aborted += 1
                    continue
                dtrace.proposal(proposal)
                yield to_pb(proposal)
        finally:
            dtrace.close()
            if session is not None:
                session.close()
            self.live -= 1
            pump_task.cancel()

    def apply(self, session: DraftSession | None, req) -> DraftSession:
        kind = req.WhichOneof("kind")
        if kind is None:
            raise ProtocolError("empty DraftRequest (none of start, extend, rollback, stop)")
        if kind == "start":
            if session is not None:
                raise ProtocolError("start sent twice on one stream")
            s = req.start
            try:
                sampling = sampling_from_pb(s.sampling)
            except ValueError as e:
                raise ProtocolError(f"start.sampling: {e}") from None
            max_pos = self.loaded.model.config.max_position_embeddings
            prompt = list(s.prompt_ids)
            replay = self.replay.session(prompt) if self.replay is not None else None
            return DraftSession(self.engine, prompt, s.window_id, s.draft_until, max_pos,
                                sampling, self.q_tail, replay)
        if session is None:
            raise ProtocolError(f"{kind} before start")
        if kind == "extend":
            session.extend(req.extend.window_id, req.extend.draft_until)
        elif kind == "rollback":
            r = req.rollback
            session.rollback(r.keep, list(r.append_ids), r.window_id, r.draft_until)
        else:
            raise ProtocolError("empty DraftRequest")
        return session


async def serve(loaded, port: int, host: str = "[::]", q_tail: float = 1e-4,
                tls: ServerTLS | None = None, max_sessions: int = DEFAULT_MAX_SESSIONS,
                idle_s: float = DEFAULT_IDLE_S, replay: Replay | None = None,
                engine: EngineConfig = EngineConfig(), telemetry: Telemetry | None = None
                ) -> tuple[Server, DraftServicer]:
    servicer = DraftServicer(loaded, q_tail, replay, engine, max_sessions, idle_s, telemetry)
    server = Server.serving(servicer, "DraftService", label="draft service",
                            max_sessions=max_sessions, statuses=STATUSES,
                            store=servicer.engine.store)
    # the port opens NOT_SERVING; SERVING once the compiled steps are built (if any)
    await server.start(port, host, tls, warm_up=servicer.engine.serving_warm_up())
    log.info("draft service on port %d (%s; %s%s)", server.port, loaded.name,
             describe_engine(servicer.engine),
             f"; replaying {replay.path} at acceptance {replay.acceptance}" if replay else "")
    return server, servicer
