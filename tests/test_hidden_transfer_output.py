"""Hidden-transfer mode ends where the other modes end (an EOS token, a stop string), also when
the stop falls inside a step that commits several tokens at once, and its sampled output follows
the target's exact distribution (chi-square, top-k 4, the first three tokens)."""

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from chi2 import chi2_pvalue, exact_joint, sample_joint
from conftest import greedy_reference, hidden_transfer_cluster
from pearl.client import Client
from specdec.models import noisy_copy

PROMPT = [7, 3, 22, 41, 9, 13, 2, 30]


def test_eos_ends_hidden_transfer(ht_target, ht_trained):
    ref = greedy_reference(ht_target, PROMPT, 40)
    eos = ref[12]
    first = ref.index(eos)
    # ht_target is shared by the session: the new eos goes to a copy of its model
    target = dataclasses.replace(ht_target, model=copy.deepcopy(ht_target.model))
    target.model.generation_config.eos_token_id = eos
    c = hidden_transfer_cluster(target, ht_trained)
    try:
        with Client(c.address) as cl:
            r = cl.complete(PROMPT, mode="hidden-transfer", max_new_tokens=40)
            assert r.token_ids == ref[: first + 1]
            assert r.stats["finish_reason"] == "eos"
            r = cl.complete(PROMPT, mode="hidden-transfer", max_new_tokens=40, ignore_eos=True)
            assert r.token_ids == ref and r.stats["tokens_per_target_forward"] > 1
    finally:
        c.close()


@pytest.mark.parametrize("k", [9, 17, 26])
def test_stop_string_ends_hidden_transfer(transfer_cluster, ht_target, k):
    ref = greedy_reference(ht_target, PROMPT, 40)
    tok = ht_target.tokenizer
    stop = tok.decode(ref[k:k + 2])
    full = tok.decode(ref)
    with Client(transfer_cluster.address) as cl:
        r = cl.complete(PROMPT, mode="hidden-transfer", max_new_tokens=40, stop=[stop])
    assert r.stats["finish_reason"] == "stop"
    assert r.text == full[:full.find(stop)]
    n = next(i for i in range(1, 41) if stop in tok.decode(ref[:i]))  # first id completing it
    assert r.token_ids == ref[:n]


@pytest.mark.slow  # 1500 requests: ~30 s on two loaded cores
def test_chi_square_hidden_transfer_sampling(transfer_cluster, ht_target):
    n, top_k = 1500, 4
    joint = exact_joint(ht_target.model, PROMPT, 3, 1.0, top_k)
    other = noisy_copy(ht_target, 3, 0.3)
    control = chi2_pvalue(sample_joint(exact_joint(other.model, PROMPT, 3, 1.0, top_k), n),
                          joint)
    assert control < 1e-6, f"the test has no power: noisy-model p-value {control:.2e}"

    def one(seed):
        with Client(transfer_cluster.address) as c:
            r = c.complete(PROMPT, mode="hidden-transfer", max_new_tokens=3, temperature=1.0,
                           top_k=top_k, seed=seed, ignore_eos=True)
        return tuple(r.token_ids), r.stats

    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(one, range(5000, 5000 + n)))
    samples = [t for t, _ in done]
    accepted = sum(st["accepted_tokens"] for _, st in done)
    assert accepted > n / 10, f"the tree drafts were accepted only {accepted} times"
    pv = chi2_pvalue(samples, joint)
    print(f"hidden-transfer 3 tokens: p-value {pv:.4f} (control {control:.2e}), "
          f"{accepted} tree tokens accepted")
    assert pv > 1e-3, f"hidden-transfer samples do not follow the target ({pv:.2e})"
