"""Protobuf <-> core types for what the services share: sampling parameters, distributions and
log-probabilities."""

import numpy as np

from protos.v1 import pearl_pb2 as pb
from specdec.logprobs import TokenLogprob
from specdec.sampling import Sampling, WireDist


def sampling_from_pb(m: pb.SamplingParams) -> Sampling:
    """Raises ValueError naming the field when a value is out of range."""
    return Sampling(temperature=m.temperature, top_k=m.top_k,
                    top_p=m.top_p if m.HasField("top_p") else 1.0,
                    seed=m.seed if m.HasField("seed") else 0).check()


def sampling_to_pb(s: Sampling) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)


def dist_to_pb(d: WireDist) -> pb.TokenDistribution:
    return pb.TokenDistribution(
        token_ids=[] if d.ids is None else d.ids.tolist(),
        probs_f16=d.weights.astype("<f2").tobytes())


def dist_from_pb(m: pb.TokenDistribution, vocab: int) -> WireDist:
    """Raises ValueError when the message is malformed."""
    w = np.frombuffer(m.probs_f16, dtype="<f2").astype(np.float16)
    if m.token_ids:
        ids = np.asarray(m.token_ids, dtype=np.int64)
        if len(ids) != len(w):
            raise ValueError(f"q has {len(ids)} token_ids but {len(w)} probabilities")
        if ids.min() < 0 or ids.max() >= vocab or np.any(np.diff(ids) <= 0):
            raise ValueError("q.token_ids must be ascending ids inside the vocabulary")
    else:
        ids = None
        if len(w) != vocab:
            raise ValueError(f"dense q has {len(w)} probabilities for a vocabulary of {vocab}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.astype(np.float64).sum() <= 0:
        raise ValueError("q.probs_f16 must be finite, non-negative and not all zero")
    return WireDist(ids, w)


def logprob_to_pb(t: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob,
                           top_ids=[i for i, _ in t.top], top_logprobs=[v for _, v in t.top])


def logprob_from_pb(m: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.logprob, tuple(zip(m.top_ids, m.top_logprobs)))
