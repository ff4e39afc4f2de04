"""The Coordinator servicer: validates a request, opens the two streams, runs a schedule and
streams the committed text. Protobuf is converted here and nowhere in the schedules."""

import asyncio
import logging
import secrets
import uuid

import grpc
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from coordinator.links import DraftLink, TargetLink
from coordinator.output import Output
from coordinator.schedule import Pearl, Plan, Schedule, ServiceLost, Timing, run_ar, run_sd
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.serving import CHANNEL_OPTIONS, Server
from specdec.stats import Recorder
from specdec.wire import sampling_from_pb, sampling_to_pb

log = logging.getLogger("pearl.coordinator")

MODES = {pb.MODE_AR: "ar", pb.MODE_SD: "sd", pb.MODE_PEARL: "pearl"}
GAMMA_LIMIT = 64


class InvalidRequest(ValueError):
    pass


def tokenizer_from(info: pb.ModelInfoResponse) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(info.tokenizer_json))
    if info.chat_template:
        tok.chat_template = info.chat_template
    return tok


def stats_to_pb(stats: dict) -> pb.GenerateStats:
    return pb.GenerateStats(**stats)


class CoordinatorServicer(pearl_pb2_grpc.CoordinatorServicer):
    def __init__(self, target: str, draft: str | None, gamma: int = 4, gamma_max: int = 8):
        self.target_addr, self.draft_addr = target, draft
        self.default_gamma, self.default_gamma_max = gamma, gamma_max
        self.timing = Timing()

    async def connect(self) -> None:
        """Open channels and read both models' facts; the draft must share the vocabulary."""
        self.target_ch = grpc.aio.insecure_channel(self.target_addr, options=CHANNEL_OPTIONS)
        info = await pearl_pb2_grpc.TargetServiceStub(self.target_ch).GetModelInfo(
            pb.ModelInfoRequest(), wait_for_ready=True, timeout=600)
        self.target_info = info
        self.tokenizer = tokenizer_from(info)
        self.max_positions = info.max_positions
        self.draft_ch = None
        if self.draft_addr:
            self.draft_ch = grpc.aio.insecure_channel(self.draft_addr, options=CHANNEL_OPTIONS)
            dinfo = await pearl_pb2_grpc.DraftServiceStub(self.draft_ch).GetModelInfo(
                pb.ModelInfoRequest(), wait_for_ready=True, timeout=600)
            if dinfo.tokenizer_json != info.tokenizer_json:
                raise ValueError(f"draft {dinfo.model} and target {info.model} do not share "
                                 "a tokenizer")
            self.max_positions = min(self.max_positions, dinfo.max_positions)

    async def close(self) -> None:
        for ch in (self.target_ch, self.draft_ch):
            if ch is not None:
                await ch.close()

    def prompt_ids(self, req: pb.GenerateRequest) -> list[int]:
        if req.prompt_ids:
            ids = list(req.prompt_ids)
            bad = [t for t in ids if not 0 <= t < self.target_info.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt_ids holds ids outside the vocabulary: {bad[:5]}")
            return ids
        if not req.prompt:
            raise InvalidRequest("prompt is empty (give prompt or prompt_ids)")
        if req.chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": req.prompt}], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        return self.tokenizer.encode(req.prompt)

    def plan(self, req: pb.GenerateRequest) -> tuple[str, Plan]:
        mode = MODES.get(req.mode) if req.mode else ("pearl" if self.draft_ch else "ar")
        if mode is None:
            raise InvalidRequest(f"mode {req.mode} is not one of ar, sd, pearl")
        if mode != "ar" and self.draft_ch is None:
            raise InvalidRequest(f"mode {mode} needs a draft service; this coordinator has none")
        if req.max_new_tokens <= 0:
            raise InvalidRequest("max_new_tokens must be > 0")
        try:
            sampling = sampling_from_pb(req.sampling)
        except ValueError as e:
            raise InvalidRequest(f"sampling.{e}") from None
        if not req.sampling.HasField("seed"):  # unseeded: a fresh seed per request
            sampling = type(sampling)(sampling.temperature, sampling.top_k, sampling.top_p,
                                      secrets.randbits(63))
        if req.gamma > GAMMA_LIMIT or req.gamma_max > GAMMA_LIMIT:
            raise InvalidRequest(f"gamma and gamma_max must be <= {GAMMA_LIMIT}")
        ids = self.prompt_ids(req)
        if len(ids) + req.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the "
                f"models' context of {self.max_positions} positions")
        gamma_max = req.gamma_max or self.default_gamma_max
        gamma = req.gamma or (self.default_gamma if mode == "sd" else None)
        return mode, Plan(uuid.uuid4().hex, ids, req.max_new_tokens, self.max_positions,
                          gamma, gamma_max, sampling_to_pb(sampling))

    async def Generate(self, request, context):
        try:
            mode, plan = self.plan(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        events: asyncio.Queue = asyncio.Queue()
        target = TargetLink.open(self.target_ch, events)
        draft = DraftLink.open(self.draft_ch, events) if mode != "ar" else None
        eos = [] if request.ignore_eos else list(self.target_info.eos_token_ids)
        out = Output(self.tokenizer, plan.max_new_tokens, eos, list(request.stop))
        rec = Recorder(mode, len(plan.prompt_ids))
        s = Schedule if mode != "pearl" else Pearl
        sched = s(plan, target, draft, events, out, rec, self.timing)
        run = {"ar": lambda: run_ar(sched), "sd": lambda: run_sd(sched, plan.gamma),
               "pearl": lambda: sched.run()}[mode]
        task = asyncio.create_task(run())
        task.add_done_callback(lambda _: out.queue.put_nowait(None))
        try:
            while (delta := await out.queue.get()) is not None:
                yield pb.GenerateResponse(text=delta.text, token_ids=delta.token_ids)
            await task
        except ServiceLost as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            task.cancel()
            await target.stop()
            if draft is not None:
                await draft.stop()
        stats = rec.finish(len(out.ids), out.finish_reason or "length")
        yield pb.GenerateResponse(stats=stats_to_pb(stats))


async def serve(target: str, draft: str | None, port: int, host: str = "[::]", gamma: int = 4,
                gamma_max: int = 8) -> tuple[Server, CoordinatorServicer]:
    servicer = CoordinatorServicer(target, draft, gamma, gamma_max)
    await servicer.connect()
    server = Server([pb.DESCRIPTOR.services_by_name["Coordinator"].full_name])
    pearl_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server.grpc)
    await server.start(port, host)
    log.info("coordinator on port %d (target %s, draft %s)", server.port, target, draft)
    return server, servicer
