"""The Coordinator servicer: validates a request, opens the two streams, runs a schedule
(coordinator/schedule.py) and streams the committed text. The schedules never see protobuf
answers: the links (coordinator/links.py) turn them into plain proposals and verdicts."""

import asyncio
import logging
import secrets
import uuid

import grpc
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from coordinator.links import BACKEND_OPTIONS, DraftLink, TargetLink
from coordinator.output import Output
from coordinator.replicas import NoReplica, Pool
from coordinator.request import Plan, Request, ServiceLost
from coordinator.schedule import SCHEDULES, decode
from coordinator.timing import Timing
from coordinator.tracing import request_trace
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.defaults import (
    DEFAULT_DRAFT_TIMEOUT_S,
    DEFAULT_GAMMA,
    DEFAULT_GAMMA_MAX,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_SESSIONS,
)
from specdec.interceptor import Status
from specdec.logprobs import MAX_TOP_LOGPROBS
from specdec.security import ClientTLS, ServerTLS, TokenAuth
from specdec.serving import Server
from specdec.stats import Recorder
from specdec.telemetry import Telemetry
from specdec.wire import logprob_to_pb, sampling_from_pb, sampling_to_pb

log = logging.getLogger("pearl.coordinator")

MODES = {pb.MODE_AR: "ar", pb.MODE_SD: "sd", pb.MODE_PEARL: "pearl",
         pb.MODE_HIDDEN_TRANSFER: "hidden-transfer"}
WITH_DRAFT = ("sd", "pearl")
GAMMA_LIMIT = 64
CHARS_PER_TOKEN_BOUND = 64  # prompt text longer than this many chars per allowed token: refused
CHAT_ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """A Generate request this coordinator refuses (INVALID_ARGUMENT)."""


def lost_status(e: ServiceLost) -> grpc.StatusCode:
    """A target at its session limit mid-request asks for a retry; any other loss: UNAVAILABLE."""
    busy = e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.RESOURCE_EXHAUSTED if busy else grpc.StatusCode.UNAVAILABLE


# what a Generate call's errors answer (specdec/interceptor.py)
STATUSES: dict[type[BaseException], Status] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NoReplica: lambda e: e.code,  # the pool says why no replica took the session
    ServiceLost: lost_status,  # the target (the draft is only given up: request.py)
}


class Ending:
    """Ends one request once, whoever asks first (the servicer when Generate exits, or gRPC's
    done callback when the call ended): the schedule is stopped first, then both streams are
    closed (coordinator/links.py), in a task of its own that a second cancellation cannot cut
    short. Until then the services hold the request's sessions."""

    running: set[asyncio.Task] = set()  # referenced until done

    def __init__(self, task: asyncio.Task, links: list):
        self.task, self.links = task, [link for link in links if link is not None]
        self.closing: asyncio.Task | None = None

    def __call__(self, _context=None) -> asyncio.Task:
        if self.closing is None:
            self.closing = asyncio.ensure_future(self._close())
            self.running.add(self.closing)
            self.closing.add_done_callback(self.running.discard)
        return self.closing

    async def _close(self) -> None:
        self.task.cancel()
        await asyncio.wait({self.task})
        await asyncio.gather(*(link.stop() for link in self.links))


def tokenizer_from(info: pb.ModelInfoResponse) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(info.tokenizer_json))
    if info.chat_template:
        tok.chat_template = info.chat_template
    return tok


def stats_to_pb(stats: dict) -> pb.GenerateStats:
    return pb.GenerateStats(**stats)


class CoordinatorServicer(pearl_pb2_grpc.CoordinatorServicer):
    telemetry = Telemetry.off()  # traces and metrics (specdec/telemetry.py), unless given

    def __init__(self, target: str, draft: str | None, gamma: int = DEFAULT_GAMMA,
                 gamma_max: int = DEFAULT_GAMMA_MAX, backend_tls: ClientTLS | None = None,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 draft_timeout_s: float = DEFAULT_DRAFT_TIMEOUT_S,
                 telemetry: Telemetry | None = None):
        self.target_addr, self.draft_addr = target, draft
        self.default_gamma, self.default_gamma_max = gamma, gamma_max
        # reliability and security settings (docs/design.md section 11)
        self.backend_tls = backend_tls  # TLS/mTLS towards draft and target
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.draft_timeout_s = draft_timeout_s  # a draft silent this long is given up
        if telemetry is not None:
            self.telemetry = telemetry
        self.http = None  # the OpenAI-compatible HTTP front (coordinator/openai_http), if any
        self.timing = Timing()

    async def connect(self) -> None:
        """Resolve draft and target into pools of replicas (coordinator/replicas.py) and read
        both models' facts; the draft must share the vocabulary."""
        self.targets = Pool("target", self.target_addr, BACKEND_OPTIONS, self.backend_tls)
        info = await self.targets.start()
        self.target_info = info
        self.tokenizer = tokenizer_from(info)
        self.max_positions = info.max_positions
        self.drafts: Pool | None = None
        if self.draft_addr:
            self.drafts = Pool("draft", self.draft_addr, BACKEND_OPTIONS, self.backend_tls)
            dinfo = await self.drafts.start()
            if dinfo.tokenizer_json != info.tokenizer_json:
                raise ValueError(f"draft {dinfo.model} and target {info.model} do not share "
                                 "a tokenizer")
            self.max_positions = min(self.max_positions, dinfo.max_positions)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        for pool in (self.targets, self.drafts):
            if pool is not None:
                await pool.close()

    async def open_links(self, uses_draft: bool, events: asyncio.Queue
                         ) -> tuple[TargetLink, DraftLink | None, str | None]:
        """The request's streams, each on the replica its pool chose, and why there is no draft
        link when the mode wants one (the target then runs alone). Raises NoReplica when no
        target replica takes the session."""
        want_draft = uses_draft and self.drafts is not None
        tasks = [asyncio.ensure_future(self.targets.place(TargetLink.open, events))]
        if want_draft:
            tasks.append(asyncio.ensure_future(self.drafts.place(DraftLink.open, events)))
        try:
            await asyncio.wait(tasks)
        except BaseException:  # cancelled: no stream may outlive the request
            for task in tasks:
                task.cancel()
                if task.done() and not task.cancelled() and task.exception() is None:
                    task.result()[1].cancel()
            raise
        placed = [t.exception() or t.result()[1] for t in tasks]
        for p in placed:
            if isinstance(p, BaseException) and not isinstance(p, NoReplica):
                raise p
        draft = placed[1] if want_draft and not isinstance(placed[1], NoReplica) else None
        if isinstance(placed[0], NoReplica):
            if draft is not None:
                draft.cancel()
            raise placed[0]
        down = str(placed[1]) if want_draft and draft is None else None
        return placed[0], draft, down

    def prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        if req.messages:
            return self.chat_ids([(m.role, m.content) for m in req.messages])
        if req.prompt_ids:
            ids = list(req.prompt_ids)
            bad = [t for t in ids if not 0 <= t < self.target_info.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt_ids holds ids outside the vocabulary: {bad[:5]}")
            return ids
        if not req.prompt:
            raise InvalidRequest("prompt is empty (give prompt, prompt_ids or messages)")
        if len(req.prompt) > CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(req.prompt)} characters; this server takes "
                                 f"at most {self.max_prompt_tokens} prompt tokens")
        if req.chat:
            return self.chat_ids([("user", req.prompt)])
        return self.tokenizer.encode(req.prompt)

    def chat_ids(self, messages: list[tuple[str, str]]) -> list[int]:
        """A conversation rendered with the target tokenizer's chat template, ending with the
        assistant's generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("chat: the target's tokenizer has no chat template")
        for i, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role is {role!r}; one of "
                                     f"{', '.join(CHAT_ROLES)}")
        chars = sum(len(content) for _, content in messages)
        if chars > CHARS_PER_TOKEN_BOUND * self.max_prompt_tokens:
            raise InvalidRequest(f"messages have {chars} characters; this server takes at most "
                                 f"{self.max_prompt_tokens} prompt tokens")
        return list(self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True, tokenize=True, return_dict=False))

    def plan(self, req: pb.GenerateRequest) -> tuple[str, Plan]:
        mode = MODES.get(req.mode) if req.mode else ("pearl" if self.drafts else "ar")
        if mode is None:
            raise InvalidRequest(f"mode {req.mode} is not one of {', '.join(MODES.values())}")
        if mode in WITH_DRAFT and self.drafts is None:
            raise InvalidRequest(f"mode {mode} needs a draft service; this coordinator has none")
        if mode == "hidden-transfer" and not self.target_info.hidden_transfer:
            raise InvalidRequest("mode hidden-transfer needs transfer layers on the target "
                                 "service; it has none (pearl transfer train; pearl serve target "
                                 "--transfer FILE)")
        if req.max_new_tokens <= 0:
            raise InvalidRequest("max_new_tokens must be > 0")
        if req.max_new_tokens > self.max_new_tokens:  # a negative value arrives as >= 2^31
            raise InvalidRequest(f"max_new_tokens={req.max_new_tokens} exceeds this server's "
                                 f"limit of {self.max_new_tokens}")
        try:
            sampling = sampling_from_pb(req.sampling)
        except ValueError as e:
            raise InvalidRequest(f"sampling.{e}") from None
        if not req.sampling.HasField("seed"):  # unseeded: a fresh seed per request
            sampling = type(sampling)(sampling.temperature, sampling.top_k, sampling.top_p,
                                      secrets.randbits(63))
        if req.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs={req.top_logprobs} is out of range: "
                                 f"0..{MAX_TOP_LOGPROBS}")
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs")
        for field in ("gamma", "gamma_max"):
            if getattr(req, field) > GAMMA_LIMIT:
                raise InvalidRequest(f"{field}={getattr(req, field)} is out of range: 0 (server "
                                     f"default) or 1..{GAMMA_LIMIT}")
        ids = self.prompt_ids(req)
        beyond = sorted({t for t in ids if t >= self.target_info.vocab_size})
        if beyond:  # a tokenizer with tokens the model lacks (specdec.models.beyond_vocab)
            raise InvalidRequest(
                f"prompt tokenizes to ids {beyond[:5]} "
                f"({', '.join(map(repr, self.tokenizer.convert_ids_to_tokens(beyond[:5])))}) "
                f"beyond the target's vocabulary of {self.target_info.vocab_size}: its "
                "tokenizer has tokens the model has no embedding for")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; this server takes at most "
                                 f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        if len(ids) >= self.max_positions:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; the models' context is "
                                 f"{self.max_positions} positions")
        if len(ids) + req.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the "
                f"models' context of {self.max_positions} positions")
        gamma_max = req.gamma_max or self.default_gamma_max
        gamma = req.gamma or (self.default_gamma if mode == "sd" else None)
        return mode, Plan(uuid.uuid4().hex, ids, req.max_new_tokens, self.max_positions,
                          gamma, gamma_max, sampling_to_pb(sampling), self.draft_timeout_s,
                          req.top_logprobs if req.logprobs else None)

    async def Generate(self, request, context):
        mode, plan = self.plan(request)
        events: asyncio.Queue = asyncio.Queue()
        # a replica each (coordinator/replicas.py); without a draft the target runs alone
        target, draft, down = await self.open_links(mode in WITH_DRAFT, events)
        rtrace = request_trace(self.telemetry, context, mode, plan)  # pearl.generate
        eos = [] if request.ignore_eos else list(self.target_info.eos_token_ids)
        out = Output(self.tokenizer, plan.max_new_tokens, eos, list(request.stop))
        rec = Recorder(mode, len(plan.prompt_ids))
        schedule = SCHEDULES[mode](Request(plan, target, draft, events, out, rec, self.timing))
        # the links inject the request span into the streams
        task = rtrace.task(decode(schedule, down))
        task.add_done_callback(lambda _: out.queue.put_nowait(None))
        ending = Ending(task, [target, draft])
        context.add_done_callback(ending)  # also when the handler is left suspended at a yield
        try:
            while (delta := await out.queue.get()) is not None:
                yield pb.GenerateResponse(text=delta.text, token_ids=delta.token_ids,
                                          logprobs=[logprob_to_pb(t) for t in delta.logprobs])
            await task
        finally:
            rtrace.fail_if_raising()
            await asyncio.shield(ending())  # a second cancel must not cut the closing short
        stats = rec.finish(len(out.ids), out.finish_reason or "length")
        rtrace.done(stats, rec)
        yield pb.GenerateResponse(stats=stats_to_pb(stats))


async def serve(target: str, draft: str | None, port: int, host: str = "[::]",
                gamma: int = DEFAULT_GAMMA, gamma_max: int = DEFAULT_GAMMA_MAX,
                tls: ServerTLS | None = None, backend_tls: ClientTLS | None = None,
                auth_token: str | None = None,
                max_sessions: int = DEFAULT_MAX_SESSIONS,
                max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                draft_timeout_s: float = DEFAULT_DRAFT_TIMEOUT_S,
                http_port: int | None = None, telemetry: Telemetry | None = None
                ) -> tuple[Server, CoordinatorServicer]:
    """Connect to draft and target, then serve the gRPC API, and with ``http_port`` the
    OpenAI-compatible HTTP front beside it (coordinator/openai_http; 0 = any free port)."""
    servicer = CoordinatorServicer(target, draft, gamma, gamma_max, backend_tls,
                                   max_prompt_tokens, max_new_tokens, draft_timeout_s, telemetry)
    await servicer.connect()
    server = Server.serving(servicer, "Coordinator", label="coordinator",
                            max_sessions=max_sessions, statuses=STATUSES,
                            interceptors=[TokenAuth(auth_token)] if auth_token else [])
    if http_port is not None:
        from coordinator.openai_http.server import HttpFront

        servicer.http = HttpFront(servicer, server, http_port, host, tls, auth_token)
    await server.start(port, host, tls)
    log.info("coordinator on port %d (target %s, draft %s)", server.port, target, draft)
    if servicer.http is not None:
        await servicer.http.start()
    return server, servicer
