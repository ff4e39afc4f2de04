"""The benchmarking pieces for machines that cannot hold the real pair: random models in a real
shape whose greedy choices are decisive, and a draft that replays the target's own tokens with a
chosen acceptance (draft_service/replay.py). Output stays lossless: only the target decides."""

import json

import pytest
import torch

from conftest import greedy_reference
from draft_service.replay import Replay
from pearl.client import Client
from pearl.cluster import Cluster
from specdec import models


def test_replay_proposes_the_reference_at_the_asked_rate(tmp_path):
    prompt, cont = [1, 2, 3], list(range(100, 2100))
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps(prompt + cont) + "\n" + json.dumps([9, 9] + cont) + "\n")
    r = Replay(path, 0.7).session(prompt)
    hits = 0
    for n in range(len(cont)):
        ids = prompt + cont[:n]
        own = 5 if n % 2 else cont[n]  # the draft's own token, sometimes right by itself
        t = r.token(ids, own)
        if t != cont[n]:  # a miss proposes the draft's own token, or a neighbour when it is right
            assert t == (own if own != cont[n] else cont[n] - 1), (n, t, own)
        hits += t == cont[n]
    assert abs(hits / len(cont) - 0.7) < 0.04
    assert r.token(prompt + [7], 42) == 42  # off the reference: the draft's own token
    assert Replay(path, 0.7).session(prompt).token(prompt, 0) == r.token(prompt, 0)  # seeded
    with pytest.raises(ValueError):
        Replay(path, 1.5)


@pytest.mark.parametrize("acceptance", [0.5, 0.9])
def test_replaying_draft_through_the_services(tmp_path, tiny_target, acceptance):
    """sd and pearl with a replaying draft: the target's exact greedy output, and sd's acceptance
    near what a per-token agreement of ``acceptance`` gives with gamma 3 (the tokens of a window
    after its first wrong one are off the reference and rejected too): (a + a^2 + a^3) / 3. The
    draft model itself is a poor copy that agrees with the target almost nowhere."""
    from specdec.models import noisy_copy

    prompt, n = list(range(40, 60)), 200
    ref = greedy_reference(tiny_target, prompt, n + 8)
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps(prompt + ref) + "\n")
    draft = noisy_copy(tiny_target, 11, 2.0)  # agrees with the target almost nowhere
    c = Cluster(draft, tiny_target, draft_kw={"replay": Replay(path, acceptance)})
    try:
        with Client(c.address) as cl:
            for mode in ("sd", "pearl"):
                r = cl.complete(prompt, mode=mode, max_new_tokens=n, gamma=3 if mode == "sd" else 0)
                assert r.token_ids == ref[:n], mode
                if mode == "sd":
                    expect = sum(acceptance ** i for i in (1, 2, 3)) / 3
                    assert abs(r.stats["acceptance_rate"] - expect) < 0.12, r.stats
            # a replaying draft refuses to sample; the target finishes alone (the draft is an
            # accelerator, not a dependency)
            r = cl.complete(prompt, mode="pearl", max_new_tokens=4, temperature=0.7, seed=1)
            assert r.stats["fell_back"] and "replays greedy" in r.stats["fallback_reason"]
    finally:
        c.close()


def test_random_shape_is_decisive_and_reproducible(tmp_path, monkeypatch):
    tok = models.tiny_tokenizer(512)
    tok.save_pretrained(tmp_path)
    monkeypatch.setenv("PEARL_RANDOM_TOKENIZER", str(tmp_path))
    monkeypatch.setitem(models.SHAPES, "test-tiny", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    a = models.load_model("random:test-tiny", "cpu", "bfloat16")
    b = models.load_model("random:test-tiny", "cpu", "bfloat16")
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert a.model.generation_config.eos_token_id is None
    with torch.inference_mode():
        logits = a.model(torch.tensor([[5, 77, 300]])).logits[0].float()  # [3, vocab]
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.2  # far above bfloat16 rounding at these logits
    with pytest.raises(ValueError, match="unknown shape"):
        models.load_model("random:nope", "cpu", "bfloat16")
