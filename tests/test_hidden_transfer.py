"""Hidden Transfer: tree attention, KV compaction, training, and the mode end to end (tiny models:
``ht_target`` and ``ht_trained`` in conftest.py)."""

import random

import grpc
import pytest
import torch
from conftest import HT_K as K, HT_LAYER as LAYER, HT_VOCAB as V, greedy_reference
from conftest import ht_prompts as random_prompts

from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.engine import Engine
from specdec.sampling import Sampling
from pearl.transfer_train import RANKS, TreeKV, logits, tree_forward
from target_service.hidden_transfer.layers import Transfer, TransferLayers
from target_service.hidden_transfer.session import HiddenTransferSession
from target_service.hidden_transfer.tree import chain_paths, tree_paths
from target_service.verifier import TargetSession


@pytest.fixture(scope="module")
def engine(ht_target):
    """The engine of the sessions built here on ``ht_target`` (the services build their own)."""
    e = Engine(ht_target.model, 16_384, name="ht-target")
    yield e
    e.close()


def prefilled(model, transfer, prompt: list[int]) -> TreeKV:
    kv = TreeKV(model.config.num_hidden_layers)
    n = len(prompt)
    tree_forward(model, transfer, kv, prompt, list(range(-1, n - 1)), list(range(n)), [n - 1])
    kv.keep(list(range(n)))
    return kv


def branch(parents: list[int], tokens: list[int], j: int) -> list[int]:
    path = []
    while j >= 0:
        path.append(tokens[j])
        j = parents[j]
    return path[::-1]


@torch.inference_mode()
def test_tree_logits_equal_each_branch_run_as_a_sequence(ht_target, ht_trained):
    model, tr = ht_target.model, ht_trained.layers
    prompt = random_prompts(1, 9, 1)[0]
    rng = random.Random(3)
    parents = [-1] + [rng.randrange(0, j) for j in range(1, 14)]  # a random tree of 14 nodes
    tokens = [rng.randrange(1, V) for _ in parents]
    depths = [0] * len(parents)
    for j, p in enumerate(parents):
        depths[j] = depths[p] + 1 if p >= 0 else 0
    assert max(depths) >= 3 and len(set(parents)) < len(parents) - 1  # deep and branching
    out = tree_forward(model, tr, prefilled(model, tr, prompt), tokens, parents, depths,
                       list(range(len(tokens))))
    for j in range(len(tokens)):
        seq = prompt + branch(parents, tokens, j)
        plain = model(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits(model, out.nodes[j]), plain, atol=1e-4, rtol=1e-4)
        # the node's pseudo tokens see only its branch: the same as in a tree of that branch alone
        alone = tree_forward(model, tr, prefilled(model, tr, seq[:-1]), [seq[-1]], [-1], [0], [0])
        torch.testing.assert_close(out.pseudo[j], alone.pseudo[0], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_kv_compaction_equals_recomputing(ht_target, ht_trained, engine):
    model, tr = ht_target.model, ht_trained.layers
    prompt = random_prompts(1, 7, 2)[0]
    paths = tree_paths(ht_trained.rank_acceptance, 10, K)
    s = HiddenTransferSession(engine, tr, paths, prompt, 1024)
    s.start()
    accepted = 0
    for _ in range(12):
        accepted += s.step().accepted
    assert accepted > 0, "no tree node was ever accepted: compaction of a branch is untested"
    fresh = prefilled(model, tr, s.ids[:-1])  # the committed sequence recomputed from scratch
    n = len(s.ids) - 1
    assert s.seq.cached == fresh.length == n
    store = s.seq.engine.store
    for layer in range(model.config.num_hidden_layers):  # the engine's pages after compaction
        k, v = store.read(layer, s.seq.slots, n)
        torch.testing.assert_close(k, fresh.k[layer][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, fresh.v[layer][0], atol=1e-5, rtol=1e-4)
    # the next step from the compacted store decides as a session started on the same ids
    again = HiddenTransferSession(engine, tr, paths, s.ids, 1024)
    first = again.start().token_id
    v = s.step()
    assert (v.accepted_ids + [v.token_id])[0] == first
    s.close()
    again.close()


def run_session(engine, tr, paths, prompt, n, sampling=Sampling()) -> tuple[list[int], int, int]:
    s = HiddenTransferSession(engine, tr, paths, prompt, 1024, sampling)
    out = [s.start().token_id]
    forwards = 1
    while len(out) < n:
        v = s.step()
        forwards += 1
        out += v.accepted_ids + [v.token_id]
    return out[:n], forwards, len(s.ids)


@pytest.mark.parametrize("shape", ["chain", "trained", "wide"])
def test_greedy_output_equals_generate(ht_target, ht_trained, engine, shape):
    paths = {"chain": chain_paths(K), "trained": tree_paths(ht_trained.rank_acceptance, 10, K),
             "wide": [(r,) for r in range(8)] + [(r, s) for r in range(3) for s in range(3)]
             }[shape]
    saved = 0
    for prompt in random_prompts(4, 6, 9):
        for n in (1, 7, 30):
            out, forwards, _ = run_session(engine, ht_trained.layers, paths, prompt, n)
            assert out == greedy_reference(ht_target, prompt, n), (shape, prompt, n)
            saved += n - forwards
    assert saved > 0, "the trained drafts never saved a forward pass"


def test_seeded_sampling_equals_the_target_alone(ht_trained, engine):
    """Each position is drawn from the target's own distribution with the draw ar uses."""
    paths = tree_paths(ht_trained.rank_acceptance, 10, K)
    for seed in (1, 2, 3):
        sampling = Sampling(temperature=0.8, top_k=20, seed=seed)
        prompt = random_prompts(1, 6, seed)[0]
        out, _, _ = run_session(engine, ht_trained.layers, paths, prompt, 24, sampling)
        ar = TargetSession(engine, prompt, 1024, sampling)
        ref = [ar.start(True).token_id]
        while len(ref) < 24:
            ref.append(ar.verify(len(ar.seq), [], [], True, False).token_id)
        assert out == ref


def test_training_reduces_held_out_kl(ht_trained):
    info = ht_trained.info
    assert info["held_out_kl_after"] < 0.97 * info["held_out_kl_before"], info
    acc = ht_trained.rank_acceptance
    assert len(acc) == K and all(len(row) == RANKS for row in acc)
    assert acc[0][0] > max(acc[0][1:]), "the top candidate should be the most often right"


def test_save_and_load_round_trip(tmp_path, ht_target, ht_trained):
    path = tmp_path / "t.safetensors"
    ht_trained.save(path)
    back = Transfer.load(path)
    assert (back.layers.layer, back.layers.k, back.layers.rank) == (LAYER, K, 16)
    assert back.rank_acceptance == ht_trained.rank_acceptance and back.info == ht_trained.info
    h = torch.randn(3, ht_target.model.config.hidden_size)
    # weights are stored in bfloat16: equal to that precision
    torch.testing.assert_close(back.layers(h), ht_trained.layers(h), atol=3e-2, rtol=3e-2)
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(Exception):
        Transfer.load(tmp_path / "bad.safetensors")


def test_tree_paths_hand_computed():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.1, 0.0]]
    # scores: (0) .6, (0,0) .3, (1) .2, (1,0) .1, (2) .1, (0,1) .06 ...
    assert tree_paths(acc, 3, 2) == [(0,), (1,), (0, 0)]
    assert tree_paths(acc, 5, 2) == [(0,), (1,), (2,), (0, 0), (1, 0)]
    assert tree_paths(acc, 2, 1) == [(0,), (1,)]  # k caps the depth
    assert chain_paths(3) == [(0,), (0, 0), (0, 0, 0)]


def test_untrained_layers_copy_the_state_forward():
    tl = TransferLayers(8, 1, 2, 4)
    h = torch.randn(5, 8)
    torch.testing.assert_close(tl(h), h[:, None].expand(5, 2, 8))


# -- the mode through real gRPC services on loopback ------------------------------------------


def test_mode_end_to_end_is_lossless(transfer_cluster, ht_target):
    with Client(transfer_cluster.address) as c:
        fewer = 0
        for prompt in random_prompts(3, 8, 21):
            r = c.complete(prompt, mode="hidden-transfer", max_new_tokens=32, ignore_eos=True)
            assert r.token_ids == greedy_reference(ht_target, prompt, 32)
            s = r.stats
            assert s["mode"] == "hidden-transfer" and s["new_tokens"] == 32
            assert len(s["per_position_acceptance"]) == K
            assert s["draft_forwards"] == 0 and s["overlap_ratio"] == 0
            fewer += s["target_forwards"] < 32
            assert s["tokens_per_target_forward"] == pytest.approx(32 / s["target_forwards"])
        assert fewer, "hidden transfer never committed more than one token per forward"
        info = pearl_pb2_grpc.TargetServiceStub(grpc.insecure_channel(
            transfer_cluster.target_address)).GetModelInfo(pb.ModelInfoRequest())
        assert info.hidden_transfer.startswith(f"layer {LAYER}, k {K}")


def test_mode_sampling_matches_ar_with_the_same_seed(transfer_cluster):
    prompt = random_prompts(1, 8, 5)[0]
    with Client(transfer_cluster.address) as c:
        runs = {m: c.complete(prompt, mode=m, max_new_tokens=24, temperature=0.9, seed=11,
                              ignore_eos=True).token_ids for m in ("ar", "hidden-transfer")}
    assert runs["ar"] == runs["hidden-transfer"]


def test_mode_refused_without_transfer_layers(cluster):
    with Client(cluster.address) as c, pytest.raises(grpc.RpcError) as e:
        c.complete("abc", mode="hidden-transfer", max_new_tokens=4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transfer layers" in e.value.details()
    # the target refuses the session itself too, with the reason
    stub = pearl_pb2_grpc.TargetServiceStub(grpc.insecure_channel(cluster.target_address))
    start = pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=[1, 2], first_token=True,
                                                  hidden_transfer=True))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Verify(iter([start])))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("window, message", [
    (pb.VerifyWindow(position=9, draft_ids=[3]), "draft_ids"),
    (pb.VerifyWindow(position=9, held=True), "held"),
    (pb.VerifyWindow(position=4), "position=4"),
])
def test_bad_windows_in_a_hidden_transfer_session(transfer_cluster, window, message):
    stub = pearl_pb2_grpc.TargetServiceStub(
        grpc.insecure_channel(transfer_cluster.target_address))
    reqs = [pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=list(range(1, 9)), first_token=True,
                                                  hidden_transfer=True)),
            pb.VerifyRequest(window=window)]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Verify(iter(reqs)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_start_without_first_token_is_refused(transfer_cluster):
    stub = pearl_pb2_grpc.TargetServiceStub(
        grpc.insecure_channel(transfer_cluster.target_address))
    start = pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=[1, 2], hidden_transfer=True))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Verify(iter([start])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first_token" in e.value.details()
