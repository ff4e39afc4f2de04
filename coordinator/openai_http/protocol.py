"""The OpenAI API's request bodies (pydantic v2) and the answers built from the Generate stream.

Only what the coordinator can honour is accepted; a field that asks for something it cannot do
(n > 1, tools, response_format, echo, suffix, best_of) is refused by name rather than ignored.
Fields the API has and this server does not know are accepted (extra="allow") and logged once.
PEARL's own knobs (mode, gamma, gamma_max, top_k, ignore_eos, timeout) sit beside the standard
ones, where the openai SDK's `extra_body` puts them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protos.v1 import pearl_pb2 as pb
from specdec.logprobs import MAX_TOP_LOGPROBS

MODES = {"ar": pb.MODE_AR, "sd": pb.MODE_SD, "pearl": pb.MODE_PEARL,
         "hidden-transfer": pb.MODE_HIDDEN_TRANSFER}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason
MAX_STOP = 16  # stop strings per request


class Unsupported(ValueError):
    """A field this server cannot honour: a 400 naming it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class Common(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # PEARL's own (extra_body)
    mode: Literal["ar", "sd", "pearl", "hidden-transfer"] | None = None
    gamma: Annotated[int, Field(ge=0, le=64)] = 0
    gamma_max: Annotated[int, Field(ge=0, le=64)] = 0
    top_k: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds: the gRPC deadline

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def refuse(self, *names: str) -> None:
        for name in names:
            if getattr(self, name, None) not in (None, False, [], {}):
                raise Unsupported(name, f"{name} is not supported by this server")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def to_pb(self) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(temperature=self.temperature or 0.0, top_k=self.top_k)
        if self.top_p is not None and self.top_p < 1:
            sampling.top_p = self.top_p
        if self.seed is not None:
            sampling.seed = self.seed
        return pb.GenerateRequest(mode=MODES[self.mode] if self.mode else pb.MODE_UNSPECIFIED,
                                  sampling=sampling, gamma=self.gamma, gamma_max=self.gamma_max,
                                  stop=self.stops(), ignore_eos=self.ignore_eos)


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def to_pb(self) -> pb.GenerateRequest:
        self.refuse("tools", "functions", "tool_choice", "response_format", "audio", "prediction")
        if self.top_logprobs and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs=true")
        req = super().to_pb()
        req.messages.extend(pb.ChatMessage(role=m.role, content=m.text()) for m in self.messages)
        req.logprobs, req.top_logprobs = self.logprobs, self.top_logprobs or 0
        return req

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Common):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # the API's own default

    def to_pb(self) -> pb.GenerateRequest:
        self.refuse("echo", "suffix", "logit_bias")
        if getattr(self, "best_of", None) not in (None, 1):
            raise Unsupported("best_of", "best_of > 1 is not supported by this server")
        req = super().to_pb()
        if isinstance(self.prompt, str):
            req.prompt = self.prompt
        else:
            req.prompt_ids.extend(self.prompt)
        if self.logprobs is not None:
            req.logprobs, req.top_logprobs = True, self.logprobs
        return req

    def wanted_tokens(self) -> int | None:
        return self.max_tokens


# -- answers --------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(stats: pb.GenerateStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens}}


def metrics(stats: pb.GenerateStats) -> dict:
    """The request's speculative statistics, as vLLM reports them per request."""
    return {
        "mode": stats.mode,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_tokens": stats.mean_accepted_tokens,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "per_position_acceptance": list(stats.per_position_acceptance),
        "overlap_ratio": stats.overlap_ratio,
        "tokens_per_target_forward": stats.tokens_per_target_forward,
        "fell_back": stats.fell_back,
        "fallback_reason": stats.fallback_reason,
        "time_to_first_token_s": stats.time_to_first_token_s,
        "tokens_per_s": stats.tokens_per_s,
        "wall_s": stats.wall_s,
    }


class Tokens:
    """Token ids as the API shows them: text pieces and their UTF-8 bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_entry(self, lp: pb.TokenLogprob) -> dict:
        def one(token_id: int, logprob: float) -> dict:
            t = self.text(token_id)
            return {"token": t, "logprob": logprob, "bytes": list(t.encode())}
        return {**one(lp.token_id, lp.logprob),
                "top_logprobs": [one(i, p) for i, p in zip(lp.top_ids, lp.top_logprobs)]}

    def completion_logprobs(self, lps: list[pb.TokenLogprob], offset: int = 0) -> dict:
        tokens = [self.text(lp.token_id) for lp in lps]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.text(i): p for i, p in zip(lp.top_ids, lp.top_logprobs)}
                                 for lp in lps],
                "text_offset": offsets}


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
