"""A typed client for the Coordinator's Generate API.

    with Client("localhost:50050") as c:
        for part in c.generate("def fib(n):", mode="pearl", max_new_tokens=64):
            if isinstance(part, Delta):
                print(part.text, end="", flush=True)
            else:
                print(part.stats["tokens_per_s"])
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.json_format import MessageToDict
from opentelemetry import propagate

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.security import ClientTLS, bearer_metadata, sync_channel
from specdec.serving import CHANNEL_OPTIONS

MODES = {"ar": pb.MODE_AR, "sd": pb.MODE_SD, "pearl": pb.MODE_PEARL,
         "hidden-transfer": pb.MODE_HIDDEN_TRANSFER}


@dataclass
class Delta:
    """Text and token ids committed since the previous part."""

    text: str
    token_ids: list[int]


@dataclass
class Result:
    """The end of a generation: all text, all new token ids, and the statistics."""

    text: str
    token_ids: list[int]
    mode: str
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "mode": self.mode, **self.stats}


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
                 token: str | None = None):
        """``tls_ca``: PEM file of the CA that signed the coordinator's certificate (TLS);
        ``tls_cert``/``tls_key``: this client's certificate when the coordinator asks for one
        (mutual TLS); ``token``: bearer token when the coordinator requires one."""
        tls = ClientTLS.from_flags(tls_ca, tls_cert, tls_key)
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

    def generate(self, prompt: str | list[int], mode: str = "pearl", max_new_tokens: int = 64,
                 gamma: int = 0, gamma_max: int = 0, stop: list[str] | None = None,
                 ignore_eos: bool = False, chat: bool = False, temperature: float = 0.0,
                 top_k: int = 0, top_p: float | None = None, seed: int | None = None
                 ) -> Iterator[Delta | Result]:
        """Stream the committed text as ``Delta`` parts, then one ``Result``.

        temperature 0 is greedy; top_p None and top_k 0 leave the distribution untruncated;
        seed None lets the coordinator pick one."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        sampling = pb.SamplingParams(temperature=temperature, top_k=top_k)
        if top_p is not None:
            sampling.top_p = top_p
        if seed is not None:
            sampling.seed = seed
        req = pb.GenerateRequest(mode=MODES[mode], max_new_tokens=max_new_tokens, gamma=gamma,
                                 gamma_max=gamma_max, stop=stop or [], ignore_eos=ignore_eos,
                                 chat=chat, sampling=sampling)
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_ids.extend(prompt)
        text, ids = [], []
        md: dict[str, str] = {}
        propagate.inject(md)  # a traced caller's span becomes the parent of pearl.generate
        for resp in self.stub.Generate(req, timeout=self.timeout_s, wait_for_ready=True,
                                       metadata=tuple(md.items()) + self.auth):
            if resp.HasField("stats"):
                yield Result("".join(text), ids, mode, stats_from_pb(resp.stats))
                return
            text.append(resp.text)
            ids.extend(resp.token_ids)
            yield Delta(resp.text, list(resp.token_ids))
        raise RuntimeError("the Generate stream ended without statistics")

    def complete(self, prompt: str | list[int], **kw) -> Result:
        """Generate to the end and return the ``Result``."""
        for part in self.generate(prompt, **kw):
            if isinstance(part, Result):
                return part
        raise AssertionError("unreachable")
