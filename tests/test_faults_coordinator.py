"""Faults at the edges of the coordinator's requests, with tiny models in process: a request that
fills the models' context exactly, sessions left behind by bursts of cancelled requests, and a
draft that is full."""

import random
import threading

import grpc
import pytest
from conftest import (all_sessions_freed, cluster_sessions, greedy_reference, noisy_copy,
                      wait_until)

from cluster import Cluster
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.models import tiny_loaded
from target_service.hidden_transfer.layers import Transfer, TransferLayers

CONTEXT = 64  # positions of both tiny models
NEW = 22


# -- fault 1: a request that fills the context ---------------------------------------------------


@pytest.fixture(scope="module")
def short_pair():
    target = tiny_loaded(2, max_position_embeddings=CONTEXT)
    draft = noisy_copy(target, 7, 0.08)
    layers = TransferLayers(target.model.config.hidden_size, 1, 2, 4)  # untrained: copies h
    c = Cluster(draft, target, target_kw={"transfer": Transfer(layers, target.name)})
    yield c, target
    c.close()


@pytest.mark.parametrize("room", [0, 1])  # positions left free at the end
@pytest.mark.parametrize("mode", ["ar", "sd", "pearl", "hidden-transfer"])
def test_request_filling_the_context_finishes(short_pair, mode, room):
    c, target = short_pair
    prompt = [random.Random(3).randrange(1, 90) for _ in range(CONTEXT - NEW - room)]
    ref = greedy_reference(target, prompt, NEW)
    with Client(c.address, timeout_s=60) as cl:
        for gamma in (0, 3, 8):  # adaptive, and fixed windows that end at various positions
            r = cl.complete(prompt, mode=mode, max_new_tokens=NEW, ignore_eos=True, gamma=gamma)
            assert r.token_ids == ref, f"gamma {gamma}"
            assert not r.stats["fell_back"], r.stats["fallback_reason"]
        if mode in ("sd", "pearl"):  # sampled: the bonus / held logic at the last position
            r = cl.complete(prompt, mode=mode, max_new_tokens=NEW, ignore_eos=True,
                            temperature=0.9, seed=5)
            assert len(r.token_ids) == NEW and not r.stats["fell_back"]


# -- fault 2: cancelled requests leave no sessions behind -----------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_draft, tiny_target):
    return tiny_draft, tiny_target


def test_cancel_bursts_leave_no_sessions(pair):
    """Bursts of requests (ar, sd, pearl) cancelled after a few tokens, three at a time against a
    target and a draft that take three sessions each: every session is freed within a few
    seconds, and a normal request is served afterwards. The race it guards: a stop written while
    the schedule's own write is in flight fails the call locally with INTERNAL, after which its
    cancel never reaches the target (links.py writes one message at a time)."""
    c = Cluster(*pair, target_kw=dict(max_sessions=3), draft_kw=dict(max_sessions=3))
    rng = random.Random(1)
    modes = [pb.MODE_AR, pb.MODE_SD, pb.MODE_PEARL]
    try:
        with grpc.insecure_channel(c.address) as ch:
            stub = pearl_pb2_grpc.CoordinatorStub(ch)
            for burst in range(40):
                calls = [stub.Generate(pb.GenerateRequest(
                    prompt_ids=[5, 17, 33, 2, 9, 41], mode=modes[(burst + k) % 3],
                    max_new_tokens=200, ignore_eos=True)) for k in range(3)]
                for call in calls:
                    try:
                        for _ in range(rng.randrange(1, 6)):
                            next(call)
                    except grpc.RpcError as e:  # the previous burst's sessions not yet freed
                        assert e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            grpc.StatusCode.UNAVAILABLE), e.details()
                    call.cancel()
                if burst % 10 == 9:
                    all_sessions_freed(c, 3.0)
        all_sessions_freed(c, 3.0)
        with Client(c.address, timeout_s=30) as cl:
            r = cl.complete([5, 17, 33, 2, 9, 41], mode="pearl", max_new_tokens=8)
        assert len(r.token_ids) == 8 and not r.stats["fell_back"]
    finally:
        c.close()


# -- fault 7: a full draft is RESOURCE_EXHAUSTED ---------------------------------------------------


def test_full_draft_is_reported_as_resource_exhausted(pair):
    """A draft at its session limit refuses; the request falls back to the target alone and says
    why with the draft's own status (a queued write racing the refusal made it INTERNAL)."""
    c = Cluster(*pair, draft_kw=dict(max_sessions=1))
    hold = threading.Event()

    def occupy():  # one session holds the draft's only slot
        with grpc.insecure_channel(c.draft_address) as ch:
            def requests():
                yield pb.DraftRequest(start=pb.DraftStart(prompt_ids=[1, 2], window_id=1,
                                                          draft_until=2))
                hold.wait(60)
            call = pearl_pb2_grpc.DraftServiceStub(ch).Draft(requests())
            hold.wait(60)
            call.cancel()

    t = threading.Thread(target=occupy)
    t.start()
    try:
        wait_until(lambda: cluster_sessions(c)[1] == 1, what="the draft's slot taken")
        with Client(c.address, timeout_s=30) as cl:
            for i in range(30):
                r = cl.complete([5, 17, 33, 2, 9, 41], mode=("pearl", "sd")[i % 2],
                                max_new_tokens=4)
                assert r.stats["fell_back"] and len(r.token_ids) == 4
                why = r.stats["fallback_reason"]
                assert "INTERNAL" not in why and ("RESOURCE_EXHAUSTED" in why
                                                  or "session limit" in why), why
    finally:
        hold.set()
        t.join()
        c.close()
