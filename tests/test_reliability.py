"""Faults and lifecycle (docs/design.md section 11), tiny models in process: the draft lost in the
middle of a request (killed, stalled, busy) is finished by the target alone with the same output;
a lost target fails the request with UNAVAILABLE and no statistics; cancelled, timed-out and
disconnected clients free their sessions on both services; idle sessions expire; session limits
answer RESOURCE_EXHAUSTED; a draining server says NOT_SERVING and lets in-flight requests end.
The same faults with real service processes are in tests/test_faults_processes.py."""

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from cluster import Cluster
from conftest import (all_sessions_freed, free_port, greedy_reference, health, live_sessions,
                      until_recovered, wait_until)
from coordinator.links import Event
from coordinator.request import Plan, Request
from draft_service.server import serve as serve_draft
from pearl.client import Client, Delta, Result
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import Engine
from specdec.limits import idle_get, idle_limited
from target_service.server import serve as serve_target

PROMPT = [5, 17, 33, 2, 9, 41]
N = 40


@pytest.fixture(scope="module")
def ref(tiny_target):
    return greedy_reference(tiny_target, PROMPT, N)


@pytest.fixture
def fresh(tiny_draft, tiny_target):
    """A cluster of its own (tests here kill and stall its services)."""
    made = []

    def make(**kw):
        c = Cluster(tiny_draft, tiny_target, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
        for servicer in c.servicers:  # closing a cluster ends its engines' threads, restarted too
            assert servicer.engine.thread is None or not servicer.engine.thread.is_alive()


def slow_draft(c: Cluster, after: int, delay_s: float) -> None:
    """Make the draft's forward passes hang for ``delay_s`` after ``after`` of them."""
    runner = c.draft.runner
    original = runner.run
    count = [0]

    async def run(fn, *args):
        count[0] += 1
        if count[0] > after:
            await asyncio.sleep(delay_s)
        return await original(fn, *args)

    runner.run = run

    def restore() -> None:
        runner.run = original

    return restore


# -- the draft is an accelerator ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_draft_killed_mid_request_target_finishes_alone(fresh, ref, mode):
    c = fresh()
    with Client(c.address, timeout_s=60) as cl:
        undisturbed = cl.complete(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
        assert undisturbed.token_ids == ref and not undisturbed.stats["fell_back"]
        slow_draft(c, after=0, delay_s=0.05)  # slow enough that the kill lands mid-request
        parts = cl.generate(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
        first = next(parts)
        assert isinstance(first, Delta)
        c.call(c.draft_server.stop(0))  # the draft dies: its streams are cancelled
        rest = list(parts)
    result = rest[-1]
    assert isinstance(result, Result)
    assert first.token_ids + [t for p in rest[:-1] for t in p.token_ids] == ref
    assert result.token_ids == ref and len(first.token_ids) < N
    assert result.stats["fell_back"] is True
    assert "draft" in result.stats["fallback_reason"]
    assert result.stats["new_tokens"] == N and result.stats["mode"] == mode


def test_draft_down_then_back(fresh, tiny_draft, ref):
    """While the draft is down new requests work (target alone, quickly, stats say so); once it
    is back on its address the coordinator uses it again by itself."""
    c = fresh(coordinator_kw=dict(draft_timeout_s=5))
    port = c.draft_server.port
    c.call(c.draft_server.stop(0))
    with Client(c.address, timeout_s=60) as cl:
        for mode in ("pearl", "sd", "pearl"):
            t0 = time.monotonic()
            r = cl.complete(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
            assert r.token_ids == ref
            assert r.stats["fell_back"] and r.stats["fallback_reason"]
            assert time.monotonic() - t0 < 3, "a dead draft must not make a request wait"
        c.add(*c.call(serve_draft(tiny_draft, port, "127.0.0.1")))
        deadline = time.monotonic() + 15
        while True:  # the channel reconnects with a backoff capped at a few seconds
            r = cl.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
            assert r.token_ids == ref
            if not r.stats["fell_back"]:
                break
            assert time.monotonic() < deadline, "the coordinator did not use the draft again"
            time.sleep(0.3)
        assert r.stats["draft_tokens"] > 0 and r.stats["accepted_tokens"] > 0


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_draft_stalls_past_the_deadline(fresh, ref, mode):
    c = fresh(coordinator_kw=dict(draft_timeout_s=0.3))
    slow_draft(c, after=5, delay_s=30)  # the draft goes silent after five forward passes
    with Client(c.address, timeout_s=30) as cl:
        t0 = time.monotonic()
        r = cl.complete(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
    assert time.monotonic() - t0 < 10
    assert r.token_ids == ref
    assert r.stats["fell_back"] and "no draft proposal within 0.3 s" in r.stats["fallback_reason"]


def test_draft_refusing_sessions_means_target_alone(fresh, ref):
    c = fresh(draft_kw=dict(max_sessions=1))
    hold = threading.Event()

    def occupy():  # one session holds the draft's only slot
        ch = grpc.insecure_channel(c.draft_address)
        msgs = iter([pb.DraftRequest(start=pb.DraftStart(prompt_ids=[1, 2], window_id=1,
                                                         draft_until=2))])

        def requests():
            yield from msgs
            hold.wait(30)

        call = pearl_pb2_grpc.DraftServiceStub(ch).Draft(requests())
        hold.wait(30)
        call.cancel()
        ch.close()

    t = threading.Thread(target=occupy)
    t.start()
    try:
        wait_until(lambda: live_sessions(c.draft_address) == 1, what="the draft's slot taken")
        with Client(c.address, timeout_s=30) as cl:
            r = cl.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
        assert r.token_ids == ref and r.stats["fell_back"]
        # RESOURCE_EXHAUSTED, or INTERNAL when a queued write races the refusal in gRPC core
        assert r.stats["fallback_reason"].startswith("draft stream failed")
    finally:
        hold.set()
        t.join()


def test_sampled_fallback_stays_seeded(fresh):
    """What a seed promises across a fallback: the tokens decided before the draft was lost are
    the undisturbed run's; from there the target alone decides with its own seeded draws, exactly
    what `ar` with the same seed gives continuing that prefix (the draws differ from pearl's
    after the loss: another rule decides those positions); and a request after the fault repeats
    the undisturbed run (nothing leaks across requests)."""
    c = fresh(coordinator_kw=dict(draft_timeout_s=0.3))
    n = 24
    kw = dict(max_new_tokens=n, ignore_eos=True, temperature=0.8, seed=11)
    with Client(c.address, timeout_s=30) as cl:
        a = cl.complete(PROMPT, mode="pearl", **kw)
        restore = slow_draft(c, after=3, delay_s=30)
        b = cl.complete(PROMPT, mode="pearl", **kw)
        restore()
        again = cl.complete(PROMPT, mode="pearl", **kw)
        assert not a.stats["fell_back"] and b.stats["fell_back"] and not again.stats["fell_back"]
        assert again.token_ids == a.token_ids
        assert len(b.token_ids) == n and b.token_ids != a.token_ids
        splits = [k for k in range(n) if b.token_ids[:k] == a.token_ids[:k]
                  and cl.complete(PROMPT + b.token_ids[:k], mode="ar",
                                  **{**kw, "max_new_tokens": n - k}).token_ids == b.token_ids[k:]]
    assert splits, "the fallback's tokens are neither pearl's nor the target's seeded draws"


# -- the target is a dependency -------------------------------------------------------------------


def test_requests_without_a_target_leave_no_draft_stream_behind(fresh):
    """With the target down, each request's draft stream (opened beside the target's) is ended
    whole: its session freed and its writer task gone (a dropped link must not leave its writer
    waiting, one task and call per request for as long as the outage lasts)."""
    c = fresh()
    c.call(c.target_server.stop(0))
    with Client(c.address, timeout_s=10) as cl:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                cl.complete(PROMPT, mode="pearl", max_new_tokens=4)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    async def writers() -> int:
        return sum(t.get_coro().__qualname__ == "_Outbox._send" for t in asyncio.all_tasks())

    wait_until(lambda: live_sessions(c.draft_address) == 0, what="draft sessions freed")
    wait_until(lambda: c.call(writers()) == 0, what="no stream writer left")


def test_a_refused_request_leaves_no_connectivity_poller(fresh):
    """The client tells "the coordinator answered UNAVAILABLE" from "no connection" with a health
    check, not grpc.channel_ready_future, whose connectivity polling thread outlived the call and,
    once the client closed its channel, died with "Cannot invoke RPC: Channel closed!" (seen as
    an unhandled thread exception in this module's runs)."""
    c = fresh()
    c.call(c.target_server.stop(0))
    with Client(c.address, timeout_s=10) as cl:
        with pytest.raises(grpc.RpcError) as e:
            cl.complete(PROMPT, mode="ar", max_new_tokens=4)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "target" in e.value.details()
        assert not cl.channel._connectivity_state.polling  # grpc's poller was never started


def test_target_lost_mid_request_is_unavailable_then_recovers(fresh, tiny_target, ref):
    c = fresh()
    runner = c.target.runner
    original = runner.run

    async def slow(fn, *args):
        await asyncio.sleep(0.03)
        return await original(fn, *args)

    runner.run = slow
    port = c.target_server.port
    got: list = []
    with Client(c.address, timeout_s=60) as cl:
        with pytest.raises(grpc.RpcError) as e:
            for part in cl.generate(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True):
                got.append(part)
                if len(got) == 1:
                    c.call(c.target_server.stop(0))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "target service" in e.value.details()
        assert got and not any(isinstance(p, Result) for p in got)  # never presented as complete
        c.add(*c.call(serve_target(tiny_target, port, "127.0.0.1")))
        r = until_recovered(
            lambda: cl.complete(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True), 15)
        assert r.token_ids == ref and not r.stats["fell_back"]


# -- lifecycle ----------------------------------------------------------------------------------


def _long_request(c: Cluster, **kw):
    ch = grpc.insecure_channel(c.address)
    req = pb.GenerateRequest(prompt_ids=PROMPT, mode=pb.MODE_PEARL, max_new_tokens=900,
                             ignore_eos=True)
    return ch, pearl_pb2_grpc.CoordinatorStub(ch).Generate(req, **kw)


def test_cancelled_request_frees_both_sessions(fresh):
    c = fresh()
    slow_draft(c, after=0, delay_s=0.01)
    ch, call = _long_request(c)
    next(call)
    assert live_sessions(c.draft_address) == 1
    assert live_sessions(c.target_address, pearl_pb2_grpc.TargetServiceStub) == 1
    call.cancel()
    all_sessions_freed(c)
    ch.close()


def test_deadline_exceeded_frees_both_sessions(fresh):
    c = fresh()
    slow_draft(c, after=0, delay_s=0.01)
    ch, call = _long_request(c, timeout=0.5)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    all_sessions_freed(c)
    ch.close()


def test_a_cancel_meeting_an_answer_is_not_lost():
    """A request cancelled in the loop turn in which an answer arrives must end: Python 3.11's
    asyncio.wait_for dropped such a cancel and the request decoded on to its end, holding both
    sessions (docs/design.md section 11). Same for a service's idle-limited request stream."""

    async def cancelled_as_it_arrives(awaiting, deliver) -> None:
        task = asyncio.ensure_future(awaiting)
        await asyncio.sleep(0)  # the task now waits
        deliver()  # the answer arrives ...
        task.cancel()  # ... in the same turn as the cancel
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main() -> None:
        events: asyncio.Queue = asyncio.Queue()
        plan = Plan("s", PROMPT, N, 64, draft_timeout_s=10)
        r = Request(plan, None, object(), events, None, None, None)  # a draft: the timeout applies
        await cancelled_as_it_arrives(r.next_event(),
                                      lambda: events.put_nowait(Event("draft", None, 0)))
        requests: asyncio.Queue = asyncio.Queue()

        async def stream():
            while True:
                yield await requests.get()

        limited = idle_limited(stream(), 10, None, "target")
        await cancelled_as_it_arrives(limited.__anext__(), lambda: requests.put_nowait("req"))
        queue: asyncio.Queue = asyncio.Queue()
        await cancelled_as_it_arrives(idle_get(queue, 10, None, "draft"),
                                      lambda: queue.put_nowait("req"))

    asyncio.run(main())


def test_disconnected_client_frees_both_sessions(fresh):
    c = fresh()
    slow_draft(c, after=0, delay_s=0.01)
    ch, call = _long_request(c)
    next(call)
    ch.close()  # the connection goes away without a cancel
    all_sessions_freed(c)


def test_idle_sessions_expire(fresh):
    c = fresh(draft_kw=dict(idle_s=0.3), target_kw=dict(idle_s=0.3))
    for address, stub, msg in [
        (c.target_address, pearl_pb2_grpc.TargetServiceStub,
         pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT, first_token=True))),
        (c.draft_address, pearl_pb2_grpc.DraftServiceStub,
         pb.DraftRequest(start=pb.DraftStart(prompt_ids=PROMPT, window_id=1,
                                             draft_until=len(PROMPT) + 1))),
    ]:
        release = threading.Event()

        def requests():
            yield msg
            release.wait(10)  # then silence: the coordinator "vanished" without closing

        with grpc.insecure_channel(address) as ch:
            method = stub(ch).Verify if stub is pearl_pb2_grpc.TargetServiceStub else stub(ch).Draft
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                list(method(requests(), timeout=10))
            release.set()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--session-idle-s" in e.value.details()
        assert time.monotonic() - t0 < 3
        wait_until(lambda: live_sessions(address, stub) == 0, what="idle session closed")


def test_session_limits_answer_resource_exhausted(fresh):
    c = fresh(target_kw=dict(max_sessions=1), coordinator_kw=dict(max_sessions=2))
    slow_draft(c, after=0, delay_s=0.01)
    ch1, call1 = _long_request(c)
    next(call1)  # holds the target's only session
    with Client(c.address, timeout_s=10) as cl:
        with pytest.raises(grpc.RpcError) as e:
            cl.complete(PROMPT, mode="ar", max_new_tokens=4)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "target service is at its limit of 1" in e.value.details()
    call1.cancel()
    ch1.close()
    all_sessions_freed(c)
    with Client(c.address, timeout_s=10) as cl:  # and it serves again
        assert cl.complete(PROMPT, mode="pearl", max_new_tokens=4).stats["new_tokens"] == 4

    # The coordinator's own limit, with two requests holding it for sure (each has its first
    # token; a second request refused by a full target would end and free its place at once).
    c = fresh(coordinator_kw=dict(max_sessions=2))
    slow_draft(c, after=0, delay_s=0.01)
    held = [_long_request(c) for _ in range(2)]
    for _, call in held:
        next(call)
    ch3, call3 = _long_request(c)
    with pytest.raises(grpc.RpcError) as e:
        next(call3)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "coordinator is at its limit of 2" in e.value.details()
    for ch, call in (*held, (ch3, call3)):
        call.cancel()
        ch.close()
    all_sessions_freed(c)


def test_draining_server_is_not_serving_and_finishes_in_flight(fresh, ref):
    c = fresh()
    slow_draft(c, after=0, delay_s=0.01)
    with Client(c.address, timeout_s=30) as cl:
        parts = cl.generate(PROMPT, mode="pearl", max_new_tokens=N, ignore_eos=True)
        got = [next(parts)]
        stopping = asyncio.run_coroutine_threadsafe(c.coord_server.stop(20), c.loop)
        wait_until(lambda: health(c.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as e:  # no new requests while draining
            Client(c.address, timeout_s=5).complete(PROMPT, mode="ar", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        got += list(parts)
    assert isinstance(got[-1], Result)
    assert [t for p in got[:-1] for t in p.token_ids] == ref
    stopping.result(timeout=20)


def test_empty_window_while_held_takes_the_target_token(fresh, tiny_target):
    """The protocol extension the fallback uses: with a distribution held, a window of zero
    draft tokens is answered from it (no forward pass); then plain ar windows go on."""
    c = fresh()
    ref = greedy_reference(tiny_target, PROMPT, 3)
    L = len(PROMPT)
    with grpc.insecure_channel(c.target_address) as ch:
        msgs = [pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT)),
                pb.VerifyRequest(window=pb.VerifyWindow(position=L, bonus=True)),
                pb.VerifyRequest(window=pb.VerifyWindow(position=L + 1, draft_ids=[ref[1]])),
                pb.VerifyRequest(window=pb.VerifyWindow(position=L + 2, bonus=True))]
        out = [r.result for r in pearl_pb2_grpc.TargetServiceStub(ch).Verify(iter(msgs),
                                                                           timeout=10)]
    assert (out[0].has_token, out[0].committed) == (False, L)
    assert (out[1].token_id, out[1].has_token, out[1].input_tokens, out[1].committed) == (
        ref[0], True, 0, L + 1)
    assert (out[2].accepted, out[2].has_token, out[2].committed) == (1, False, L + 2)
    assert (out[3].token_id, out[3].input_tokens, out[3].committed) == (ref[2], 0, L + 3)


def test_a_warming_target_is_not_ready_until_its_warm_up_ends(fresh, tiny_target, monkeypatch):
    """Compiled steps are built at start (``Engine.warm_up``): meanwhile the port is open, health
    answers NOT_SERVING, and sessions are refused with UNAVAILABLE naming the warm-up, so that
    Kubernetes sends a cold pod no traffic. Then SERVING, and sessions run."""
    c = fresh()
    entered, release = threading.Event(), threading.Event()

    def warm_up(self):
        entered.set()
        release.wait(30)
        return 0.0

    monkeypatch.setattr(Engine, "warm_up", warm_up)
    monkeypatch.setattr(Engine, "compiled", property(lambda self: True))  # tiny, not compiled
    port = free_port()
    address = f"127.0.0.1:{port}"
    starting = asyncio.run_coroutine_threadsafe(serve_target(tiny_target, port, "127.0.0.1"),
                                                c.loop)
    start = pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPT, first_token=True))
    try:
        assert entered.wait(30), "the server never started its warm-up"
        assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(address) as ch:
            stub = pearl_pb2_grpc.TargetServiceStub(ch)
            load = pearl_pb2_grpc.LoadReportStub(ch).GetLoad(pb.LoadRequest(), timeout=5)
            assert load.draining  # coordinators route around it (coordinator/replicas.py)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Verify(iter([start]), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "warming up" in e.value.details()
    finally:
        release.set()
    c.add(*starting.result(timeout=30))
    assert health(address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as ch:
        first = next(pearl_pb2_grpc.TargetServiceStub(ch).Verify(iter([start]), timeout=10))
    assert first.result.has_token
