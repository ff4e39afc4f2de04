"""A typed client for the Coordinator's Generate API.

    with Client("localhost:50050") as c:
        for part in c.generate("def fib(n):", mode="pearl", max_new_tokens=64):
            if isinstance(part, Delta):
                print(part.text, end="", flush=True)
            else:
                print(part.stats["tokens_per_s"])
"""

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.defaults import DEFAULT_CONNECT_TIMEOUT_S
from specdec.security import ClientTLS, bearer_metadata, sync_channel
from specdec.serving import CHANNEL_OPTIONS

MODES = {"ar": pb.MODE_AR, "sd": pb.MODE_SD, "pearl": pb.MODE_PEARL,
         "hidden-transfer": pb.MODE_HIDDEN_TRANSFER}


@dataclass
class Logprob:
    """The target's log-probability of one new token, from the forward pass that committed it
    (docs/design.md section 5), and the ``top`` most likely tokens there as (id, logprob), most
    likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def logprobs_from_pb(msgs) -> list[Logprob]:
    return [Logprob(m.token_id, m.logprob, list(zip(m.top_ids, m.top_logprobs))) for m in msgs]


@dataclass
class Delta:
    """Text and token ids committed since the previous part (and their logprobs, when asked)."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] = field(default_factory=list)  # one per id, when asked for


@dataclass
class Result:
    """The end of a generation: all text, all new token ids, and the statistics."""

    text: str
    token_ids: list[int]
    mode: str
    stats: dict = field(default_factory=dict)
    logprobs: list[Logprob] = field(default_factory=list)  # one per id, when asked for

    def to_json(self) -> dict:
        lp = {"logprobs": [asdict(t) for t in self.logprobs]} if self.logprobs else {}
        return {"text": self.text, "token_ids": self.token_ids, "mode": self.mode, **lp,
                **self.stats}


class Unreachable(grpc.RpcError):
    """No connection to the coordinator within the connect timeout: UNAVAILABLE, with the
    likely cause."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self.message


def unreachable_hint(tls: bool, error: str) -> str:
    if "refused" in error.lower():
        return "is the coordinator running there?"
    if not tls:
        return "is the server using TLS? pass the CA that signed its certificate with --tls-ca"
    return ("is the server using TLS, and did the CA in --tls-ca sign its certificate? (mutual "
            "TLS also needs --tls-cert and --tls-key)")


def connected_within(channel: grpc.Channel, seconds: float) -> bool:
    """Whether ``channel`` reaches its server within ``seconds``: any answer to a health check
    that waits for a connection says so. Not ``grpc.channel_ready_future``: its connectivity
    polling thread outlives the call and, once the channel is closed, dies with "Cannot invoke
    RPC: Channel closed!" in the client's process."""
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                   timeout=seconds, wait_for_ready=True)
    except grpc.RpcError as e:
        return e.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    return True


def stats_from_pb(s: pb.GenerateStats) -> dict:
    d = MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["draft_length_histogram"] = {int(k): int(v) for k, v in d["draft_length_histogram"].items()}
    for name in ("target_forward_times", "draft_forward_times"):
        d[name] = {int(k): {"count": int(v.get("count", 0)), "seconds": float(v.get("seconds", 0))}
                   for k, v in sorted(d[name].items(), key=lambda kv: int(kv[0]))}
    d["speedup"] = None  # needs an ar run on the same prompt: `pearl demo` and `pearl bench` fill it
    return {k: (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in d.items()}


class Client:
    def __init__(self, address: str, timeout_s: float | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
        """``timeout_s``: deadline of each call (None: none); ``connect_timeout_s``: how long a call
        waits for a connection before it fails with ``Unreachable``; ``tls_ca``: PEM file of the
        CA that signed the coordinator's certificate (TLS); ``tls_cert``/``tls_key``: this
        client's certificate when the coordinator asks for one (mutual TLS); ``token``: bearer
        token when the coordinator requires one."""
        tls = ClientTLS.from_flags(tls_ca, tls_cert, tls_key)
        self.address, self.tls, self.connect_timeout_s = address, tls is not None, connect_timeout_s
        self.channel = sync_channel(address, CHANNEL_OPTIONS, tls)
        self.stub = pearl_pb2_grpc.CoordinatorStub(self.channel)
        self.timeout_s = timeout_s
        self.auth = bearer_metadata(token)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _stream(self, req: pb.GenerateRequest, metadata) -> Iterator[pb.GenerateResponse]:
        """The Generate stream. A call that waits for a ready channel waits forever where every
        connection attempt fails (nothing listening, plaintext to a TLS port, the wrong CA), so the
        first try does not wait: should it fail for want of a connection, the client waits for one
        at most ``connect_timeout_s`` (and what is left of ``timeout_s``), then tries again."""
        t0 = time.monotonic()

        def left() -> float | None:
            return None if self.timeout_s is None else max(
                self.timeout_s - (time.monotonic() - t0), 0.0)

        stream = self.stub.Generate(req, timeout=self.timeout_s, metadata=metadata)
        try:
            first = next(stream, None)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or connected_within(self.channel, 0.2):
                raise  # the coordinator's own answer
            within = self.connect_timeout_s if left() is None else min(self.connect_timeout_s,
                                                                         left())
            if not connected_within(self.channel, within):
                raise Unreachable(
                    f"could not connect to {self.address} within {within:g} s ({e.details()}): "
                    f"{unreachable_hint(self.tls, e.details())}") from None
            stream = self.stub.Generate(req, timeout=left(), wait_for_ready=True,
                                        metadata=metadata)
            first = next(stream, None)
        if first is not None:
            yield first
            yield from stream

    def generate(self, prompt: str | list[int] | list[dict], mode: str = "pearl",
                 max_new_tokens: int = 64,
                 gamma: int = 0, gamma_max: int = 0, stop: list[str] | None = None,
                 ignore_eos: bool = False, chat: bool = False, temperature: float = 0.0,
                 top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                 logprobs: bool = False, top_logprobs: int = 0) -> Iterator[Delta | Result]:
        """Stream the committed text as ``Delta`` parts, then one ``Result``.

        ``prompt``: text, token ids, or a conversation: a list of {"role", "content"} dicts
        (system, user, assistant) rendered with the target's chat template.

        temperature 0 is greedy; top_p None and top_k 0 leave the distribution untruncated;
        seed None lets the coordinator pick one. ``logprobs``: each new token's logprob under
        the target (``Delta.logprobs``, ``Result.logprobs``), with ``top_logprobs`` (0..5)
        most likely alternatives."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        sampling = pb.SamplingParams(temperature=temperature, top_k=top_k)
        if top_p is not None:
            sampling.top_p = top_p
        if seed is not None:
            sampling.seed = seed
        req = pb.GenerateRequest(mode=MODES[mode], max_new_tokens=max_new_tokens, gamma=gamma,
                                 gamma_max=gamma_max, stop=stop or [], ignore_eos=ignore_eos,
                                 chat=chat, sampling=sampling, logprobs=logprobs,
                                 top_logprobs=top_logprobs)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt and isinstance(prompt[0], dict):
            req.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                                for m in prompt)
        else:
            req.prompt_ids.extend(prompt)
        text, ids, lps = [], [], []
        md: dict[str, str] = {}
        propagate.inject(md)  # a traced caller's span becomes the parent of pearl.generate
        for resp in self._stream(req, tuple(md.items()) + self.auth):
            if resp.HasField("stats"):
                yield Result("".join(text), ids, mode, stats_from_pb(resp.stats), lps)
                return
            text.append(resp.text)
            ids.extend(resp.token_ids)
            delta = Delta(resp.text, list(resp.token_ids), logprobs_from_pb(resp.logprobs))
            lps.extend(delta.logprobs)
            yield delta
        raise RuntimeError("the Generate stream ended without statistics")

    def complete(self, prompt: str | list[int] | list[dict], **kw) -> Result:
        """Generate to the end and return the ``Result``."""
        for part in self.generate(prompt, **kw):
            if isinstance(part, Result):
                return part
        raise AssertionError("unreachable")
