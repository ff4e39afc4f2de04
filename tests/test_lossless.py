"""End to end over real gRPC on loopback with tiny models: every mode returns exactly the
tokens of transformers' greedy generation of the target alone, and stops where it must."""

import copy
import random

import pytest

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client, Delta, Result
from specdec.models import LoadedModel

rng = random.Random(1234)
PROMPTS = [[rng.randrange(512) for _ in range(n)] for n in (1, 6, 23, 70)]
CONFIGS = [("ar", 0), ("sd", 1), ("sd", 4), ("sd", 50), ("pearl", 0), ("pearl", 1),
           ("pearl", 3), ("pearl", 50)]


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout_s=120) as c:
        yield c


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"prompt{len(p)}")
@pytest.mark.parametrize("n", [1, 9, 48])
def test_every_mode_equals_target_greedy(client, tiny_target, prompt, n):
    ref = greedy_reference(tiny_target, prompt, n)
    for mode, gamma in CONFIGS:
        r = client.complete(prompt, mode=mode, max_new_tokens=n, gamma=gamma)
        assert r.token_ids == ref, f"{mode} gamma={gamma or 'adaptive'} diverged"
        s = r.stats
        assert s["new_tokens"] == n and s["finish_reason"] == "length"
        assert s["accepted_tokens"] <= s["draft_tokens"]
        if mode == "ar":
            assert s["target_forwards"] == n and s["draft_forwards"] == 0
        elif n > 1:  # speculation happened: the draft's tokens were judged, none fell back
            assert not s["fell_back"], s["fallback_reason"]
            assert s["draft_tokens"] > 0 and s["draft_forwards"] > 0
            if n == 48:  # the noisy draft differs from the target somewhere in 48 tokens
                assert 0 < s["acceptance_rate"] < 1, f"{mode} gamma={gamma}: {s}"


def test_speculation_saves_target_forwards(client, tiny_target):
    prompt = PROMPTS[1]
    r = {m: client.complete(prompt, mode=m, max_new_tokens=64, gamma=4 if m == "sd" else 0)
         for m in ("ar", "sd", "pearl")}
    assert r["ar"].token_ids == r["sd"].token_ids == r["pearl"].token_ids
    for m in ("sd", "pearl"):
        s = r[m].stats
        assert not s["fell_back"] and s["draft_tokens"] > 0
        assert 0 < s["acceptance_rate"] < 1, "the noisy draft should be right sometimes"
        assert s["target_forwards"] < r["ar"].stats["target_forwards"]
        assert s["tokens_per_target_forward"] > 1
        assert s["mean_accepted_tokens"] > 0
        assert s["per_position_acceptance"] and s["gamma_history"]
        assert sum(s["draft_length_histogram"].values()) >= 1


def test_streamed_text_adds_up(client, tiny_target):
    parts = list(client.generate("hello world", mode="pearl", max_new_tokens=30))
    deltas = [p for p in parts if isinstance(p, Delta)]
    result = parts[-1]
    assert isinstance(result, Result) and len(deltas) >= 2
    assert "".join(d.text for d in deltas) == result.text
    assert sum((d.token_ids for d in deltas), []) == result.token_ids
    ids = tiny_target.tokenizer.encode("hello world")
    assert result.token_ids == greedy_reference(tiny_target, ids, 30)
    assert result.text == tiny_target.tokenizer.decode(result.token_ids)


@pytest.mark.parametrize("mode,gamma", [("ar", 0), ("sd", 4), ("pearl", 0), ("pearl", 6)])
def test_stop_string_cuts_text_and_tokens(client, tiny_target, mode, gamma):
    prompt = PROMPTS[2]
    ref = greedy_reference(tiny_target, prompt, 40)
    tok = tiny_target.tokenizer
    k = 17  # stop on the text of new tokens k and k+1
    stop = tok.decode(ref[k:k + 2])
    full = tok.decode(ref)
    cut = full.find(stop)
    r = client.complete(prompt, mode=mode, max_new_tokens=40, gamma=gamma, stop=[stop])
    assert r.stats["finish_reason"] == "stop"
    assert r.text == full[:cut]
    n = next(i for i in range(1, 41) if stop in tok.decode(ref[:i]))  # first id completing it
    assert r.token_ids == ref[:n]


@pytest.mark.parametrize("mode", ["ar", "sd", "pearl"])
def test_eos_ends_generation(tiny_draft, tiny_target, mode):
    prompt = PROMPTS[1]
    ref = greedy_reference(tiny_target, prompt, 40)
    eos = ref[12]
    first = ref.index(eos)
    target = copy.copy(tiny_target)
    target.model = copy.deepcopy(tiny_target.model)
    target.model.generation_config.eos_token_id = eos
    c = Cluster(tiny_draft, LoadedModel(**vars(target)))
    try:
        with Client(c.address) as cl:
            r = cl.complete(prompt, mode=mode, max_new_tokens=40, gamma=5)
            assert r.token_ids == ref[: first + 1]
            assert r.stats["finish_reason"] == "eos"
            r = cl.complete(prompt, mode=mode, max_new_tokens=40, ignore_eos=True)
            assert r.token_ids == ref
    finally:
        c.close()
