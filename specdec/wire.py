"""Protobuf <-> core types for what the services share: sampling parameters, distributions,
log-probabilities, and the answers (proposals and verdicts, specdec/answers.py)."""

import numpy as np

from protos.v1 import pearl_pb2 as pb
from specdec.answers import Proposal, StepTiming, Verdict
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


def step_to_pb(s: StepTiming) -> dict:
    """The fields of ``DraftProposal`` and ``VerifyResult`` that say what the step cost."""
    return dict(forward_ns=s.forward_ns, started_unix_ns=s.started_unix_ns,
                input_tokens=s.input_tokens, batch_rows=s.batch_rows,
                batch_tokens=s.batch_tokens, queue_ns=s.queue_ns, cached_tokens=s.cached_tokens)


def step_from_pb(m: pb.DraftProposal | pb.VerifyResult) -> StepTiming:
    return StepTiming(m.forward_ns, m.started_unix_ns, m.input_tokens, m.batch_rows,
                      m.batch_tokens, m.queue_ns, m.cached_tokens)


def proposal_to_pb(p: Proposal[WireDist]) -> pb.DraftProposal:
    return pb.DraftProposal(window_id=p.window_id, position=p.position, token_id=p.token_id,
                            q=dist_to_pb(p.q) if p.q is not None else None,
                            **step_to_pb(p.step))


def proposal_from_pb(m: pb.DraftProposal) -> Proposal[pb.TokenDistribution]:
    """The draft's distribution stays in its protobuf form: the coordinator passes it on."""
    return Proposal(m.window_id, m.position, m.token_id, step_from_pb(m),
                    m.q if m.HasField("q") else None)


def verdict_to_pb(v: Verdict, window_id: int, phase: str) -> pb.VerifyResult:
    """``window_id`` and ``phase`` echo the request the verdict answers."""
    return pb.VerifyResult(
        position=v.position, verified=v.verified, accepted=v.accepted,
        token_id=v.token_id if v.token_id is not None else 0, has_token=v.token_id is not None,
        committed=v.committed, window_id=window_id, phase=phase, accepted_ids=v.accepted_ids,
        logprobs=[logprob_to_pb(t) for t in v.logprobs], **step_to_pb(v.step))


def verdict_from_pb(m: pb.VerifyResult) -> Verdict:
    return Verdict(m.position, m.verified, m.accepted, m.token_id if m.has_token else None,
                   m.committed, step_from_pb(m), list(m.accepted_ids),
                   [logprob_from_pb(t) for t in m.logprobs])
