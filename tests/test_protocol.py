"""The internal streams over real gRPC on loopback: message sequences, rollback, interleaving,
and protocol errors answered with INVALID_ARGUMENT."""

import queue

import grpc
import pytest

from conftest import greedy_reference
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc

PROMPT = [11, 12, 13, 14, 15]


class Stream:
    """A synchronous bidirectional stream: ``send`` requests, ``recv`` responses."""

    def __init__(self, method):
        self.q: queue.Queue = queue.Queue()
        self.responses = method(iter(self.q.get, None), timeout=60)

    def send(self, msg) -> None:
        self.q.put(msg)

    def recv(self):
        return next(self.responses)

    def close(self) -> None:
        self.q.put(None)


def draft_stream(cluster) -> Stream:
    ch = grpc.insecure_channel(cluster.draft_address)
    return Stream(pearl_pb2_grpc.DraftServiceStub(ch).Draft)


def target_stream(cluster) -> Stream:
    ch = grpc.insecure_channel(cluster.target_address)
    return Stream(pearl_pb2_grpc.TargetServiceStub(ch).Verify)


def test_draft_start_extend_rollback_stop(cluster, tiny_draft):
    L = len(PROMPT)
    ref = greedy_reference(tiny_draft, PROMPT, 5)
    s = draft_stream(cluster)
    s.send(pb.DraftRequest(start=pb.DraftStart(session_id="a", prompt_ids=PROMPT, window_id=1,
                                               draft_until=L + 3)))
    props = [s.recv().proposal for _ in range(3)]
    assert [p.position for p in props] == [L, L + 1, L + 2]
    assert [p.window_id for p in props] == [1, 1, 1]
    assert [p.token_id for p in props] == ref[:3]
    assert props[0].input_tokens == L and props[1].input_tokens == 1
    assert all(p.forward_ns > 0 for p in props)

    s.send(pb.DraftRequest(extend=pb.DraftExtend(window_id=2, draft_until=L + 5)))
    props = [s.recv().proposal for _ in range(2)]
    assert [(p.position, p.window_id) for p in props] == [(L + 3, 2), (L + 4, 2)]
    assert [p.token_id for p in props] == ref[3:5]

    x = (ref[1] + 1) % 512  # a correction that differs from what the draft had
    s.send(pb.DraftRequest(rollback=pb.DraftRollback(keep=L + 1, append_ids=[x], window_id=3,
                                                     draft_until=L + 4)))
    props = [s.recv().proposal for _ in range(2)]
    expect = greedy_reference(tiny_draft, PROMPT + [ref[0], x], 2)
    assert [(p.position, p.window_id) for p in props] == [(L + 2, 3), (L + 3, 3)]
    assert [p.token_id for p in props] == expect
    s.send(pb.DraftRequest(stop=pb.DraftStop()))
    with pytest.raises(StopIteration):
        s.recv()


def test_target_start_verify(cluster, tiny_target):
    L = len(PROMPT)
    ref = greedy_reference(tiny_target, PROMPT, 6)
    s = target_stream(cluster)
    s.send(pb.VerifyRequest(start=pb.VerifyStart(session_id="t", prompt_ids=PROMPT,
                                                 first_token=True)))
    r = s.recv().result
    assert (r.position, r.token_id, r.committed, r.phase) == (L, ref[0], L + 1, "start")
    assert r.has_token
    wrong = (ref[3] + 1) % 512
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L + 1, draft_ids=[ref[1], ref[2], wrong],
                                                   window_id=4, phase="post")))
    r = s.recv().result
    assert (r.verified, r.accepted, r.token_id, r.committed) == (3, 2, ref[3], L + 4)
    assert (r.window_id, r.phase, r.input_tokens) == (4, "post", 4)
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L + 4, draft_ids=[ref[4]],
                                                   bonus=True)))
    r = s.recv().result
    assert (r.accepted, r.token_id, r.committed, r.has_token) == (1, ref[5], L + 6, True)
    s.close()


def test_target_holds_the_next_distribution(cluster, tiny_target):
    """Without first_token or bonus the target keeps the next position's distribution and
    judges one draft token with it, with no forward pass."""
    L = len(PROMPT)
    ref = greedy_reference(tiny_target, PROMPT, 6)
    s = target_stream(cluster)
    s.send(pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT)))
    r = s.recv().result
    assert (r.has_token, r.committed) == (False, L)
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L, draft_ids=[ref[0]], held=True)))
    r = s.recv().result
    assert (r.accepted, r.has_token, r.committed, r.input_tokens) == (1, False, L + 1, 0)
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L + 1, draft_ids=ref[1:3])))
    r = s.recv().result  # all accepted, no bonus: position L + 3 is held
    assert (r.accepted, r.has_token, r.committed, r.input_tokens) == (2, False, L + 3, 3)
    wrong = (ref[3] + 1) % 512
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L + 3, draft_ids=[wrong], held=True)))
    r = s.recv().result
    assert (r.accepted, r.has_token, r.token_id, r.committed) == (0, True, ref[3], L + 4)
    s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=L + 4, draft_ids=[ref[4]], held=True)))
    with pytest.raises(grpc.RpcError) as e:  # nothing is held after a correction
        s.recv()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_interleaved_sessions(cluster, tiny_target):
    prompts = [PROMPT, [40, 41, 42], [7, 8, 9, 10, 11, 12, 13]]
    refs = [greedy_reference(tiny_target, p, 4) for p in prompts]
    streams = [target_stream(cluster) for _ in prompts]
    for s, p in zip(streams, prompts):
        s.send(pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=p, first_token=True)))
    got = [[s.recv().result.token_id] for s in streams]
    for step in range(3):
        for i, (s, p) in enumerate(zip(streams, prompts)):
            s.send(pb.VerifyRequest(window=pb.VerifyWindow(position=len(p) + step + 1,
                                                           bonus=True)))
        for i, s in enumerate(streams):
            got[i].append(s.recv().result.token_id)
    assert got == refs
    for s in streams:
        s.close()


@pytest.mark.parametrize("messages,fragment", [
    ([pb.VerifyRequest(window=pb.VerifyWindow(position=3, draft_ids=[1]))], "before start"),
    ([pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT)),
      pb.VerifyRequest(window=pb.VerifyWindow(position=99, draft_ids=[1]))], "position=99"),
    ([pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT, sampling=pb.SamplingParams(
        temperature=-1)))], "temperature must be >= 0"),
    ([pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT, sampling=pb.SamplingParams(
        temperature=1))),
      pb.VerifyRequest(window=pb.VerifyWindow(position=5, draft_ids=[1]))], "window.q has 0"),
    ([pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=[]))], "prompt_ids is empty"),
])
def test_target_protocol_errors(cluster, messages, fragment):
    assert_refused(target_stream(cluster), messages, fragment)


@pytest.mark.parametrize("messages,fragment", [
    ([pb.DraftRequest(extend=pb.DraftExtend(window_id=1, draft_until=9))], "extend before start"),
    ([pb.DraftRequest(start=pb.DraftStart(prompt_ids=PROMPT, window_id=1, draft_until=6)),
      pb.DraftRequest(rollback=pb.DraftRollback(keep=50, window_id=2, draft_until=60))],
     "rollback.keep=50"),
])
def test_draft_protocol_errors(cluster, messages, fragment):
    assert_refused(draft_stream(cluster), messages, fragment)


def assert_refused(s: Stream, messages: list, fragment: str) -> None:
    """Sending ``messages`` ends the stream with INVALID_ARGUMENT naming ``fragment``."""
    for m in messages:
        s.send(m)
    with pytest.raises(grpc.RpcError) as e:
        while True:
            s.recv()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details()


def test_rollback_aborts_the_stale_draft_step(tiny_target):
    """A rollback that lands while the draft computes a token of the old window stops that
    forward at its next layer: no proposal of the old window follows the rollback."""
    import time

    from pearl.cluster import Cluster
    from specdec.models import noisy_copy

    slow = noisy_copy(tiny_target, 3, 0.05)
    slow.model.model.layers[0].mlp.register_forward_hook(lambda *a: time.sleep(1.0))
    c = Cluster(slow, tiny_target)
    try:
        L = len(PROMPT)
        ref = greedy_reference(slow, PROMPT, 2)
        s = draft_stream(c)
        s.send(pb.DraftRequest(start=pb.DraftStart(prompt_ids=PROMPT, window_id=1,
                                                   draft_until=L + 50)))
        first = s.recv().proposal
        time.sleep(0.2)  # the next step is inside its 1 s layer now
        x = (first.token_id + 1) % 512
        s.send(pb.DraftRequest(rollback=pb.DraftRollback(keep=L, append_ids=[x], window_id=2,
                                                         draft_until=L + 3)))
        props = [s.recv().proposal for _ in range(2)]
        assert [(p.position, p.window_id) for p in props] == [(L + 1, 2), (L + 2, 2)]
        assert [p.token_id for p in props] == greedy_reference(slow, PROMPT + [x], 2)
        assert c.draft.aborted == 1 and first.token_id == ref[0]
        s.close()
    finally:
        c.close()
