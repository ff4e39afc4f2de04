"""`pearl bench latency`: the harness on tiny models (not a speed test), and the analytical
ceiling."""

import json
import math
import subprocess
import sys

import pytest

from benchmarks.ceiling import ceiling, expected_committed, sd_rate, with_prefill
from benchmarks.latency_run import CONTENDERS
from benchmarks.services import SERVICE

FLAT = {m: 0.2 for m in range(1, 10)}


def test_expected_committed():
    assert expected_committed(0.0, 3) == 1.0
    assert expected_committed(1.0, 3) == 3.0
    assert expected_committed(0.5, 3) == pytest.approx(1.75)  # 1 + 1/2 + 1/4


def test_ceiling_alpha_one_stays_in_post_verify():
    # every window accepted: gamma tokens per round of max(t_forward[gamma], gamma * t_draft)
    assert ceiling(0.1, {m: 0.3 for m in range(1, 10)}, 1.0, 3) == pytest.approx(10.0)
    assert ceiling(0.1, {m: 0.3 for m in range(1, 10)}, 1.0, 5) == pytest.approx(5 / 0.5)
    assert ceiling(0.1, {m: 0.3 for m in range(1, 10)}, 1.0, 1) == pytest.approx(2 / 0.4)


def test_ceiling_alpha_zero_is_one_token_per_pre_round():
    for g in (1, 2, 4, 8):
        assert ceiling(0.1, FLAT, 0.0, g) == pytest.approx(1 / 0.3)


def test_ceiling_balanced_case_by_hand():
    # alpha 1/2, gamma 2, t_draft 0.1, every forward 0.2:
    # PRE: 1.5 tokens, 0.3 s, success 1/4; POST1: 1 token, 0.2 s, success 1/2;
    # POST: 1.5 tokens, 0.2 s, success 1/4 (mean 4/3 rounds):
    # tokens = 1.5 + 1/4 (1 + 1/2 * 1.5 * 4/3) = 2.0; time = 0.3 + 1/4 (0.2 + 1/2 * 0.2 * 4/3)
    assert ceiling(0.1, FLAT, 0.5, 2) == pytest.approx(2.0 / (0.3 + 0.25 * (0.2 + 0.2 / 1.5)))
    assert ceiling(0.1, FLAT, 0.5, 2) == pytest.approx(120 / 23)


def test_ceiling_bounds_and_best_window():
    tf = {m: 0.25 for m in range(1, 10)}
    best = ceiling(0.08, tf, 0.9)
    assert best == max(ceiling(0.08, tf, 0.9, g) for g in range(1, 10))
    assert best > max(sd_rate(0.08, tf, 0.9, g) for g in range(1, 9))  # the overlap pays
    assert best < 1 / 0.08  # never faster than the draft alone
    assert sd_rate(0.1, FLAT, 0.0, 3) == pytest.approx(1 / 0.5)
    with pytest.raises(ValueError):
        ceiling(0.1, FLAT, 1.5, 2)


def test_service_times_pool_the_requests_and_fill_gaps():
    from benchmarks.latency_report import service_times

    recs = [{"set": "s", "prompt": i, "prefill_s": 0.5 + i,
             "target_forward_times": {1: {"count": 2, "seconds": 0.4}, 4: {"count": 3,
                                                                        "seconds": 0.9}},
             "draft_forward_times": {1: {"count": 4, "seconds": 0.4},
                                     2: {"count": 1, "seconds": 0.2}}} for i in range(2)]
    t = service_times(recs)
    assert t["t_draft"] == pytest.approx(0.1)  # 0.8 s over 8 one-token steps
    assert t["t_forward"][1] == pytest.approx(0.2) and t["t_forward"][4] == pytest.approx(0.3)
    assert t["t_forward"][2] == pytest.approx(0.2 + 0.1 / 3)  # filled between 1 and 4
    assert 5 not in t["t_forward"]  # no extrapolation
    assert t["prefill_s"] == {"s[0]": 0.5, "s[1]": 1.5}
    assert service_times(recs, min_count=5)["t_forward"] == {4: pytest.approx(0.3)}


def test_ceiling_with_prefill_by_hand():
    # 64 tokens at 8 tok/s after a 2 s prefill: 64 / (2 + 8) = 6.4 tok/s
    assert with_prefill(8.0, 64, 2.0) == pytest.approx(6.4)
    assert with_prefill(8.0, 64, 0.0) == pytest.approx(8.0)
    assert with_prefill(8.0, 0, 2.0) == 0.0


def test_margin_names_a_tie_only_within_two_ulps():
    import torch

    from benchmarks.local import Local
    from specdec.models import noisy_copy, tiny_loaded

    target = tiny_loaded(2)
    local = Local(noisy_copy(target, 7, 0.08), target, 3)
    prompt = [5, 6, 7, 8]
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt])).logits[0, -1]
    top2 = logits.topk(2).indices.tolist()
    m = local.margin(prompt[:2], prompt[2:], top2[0], top2[1])
    assert m["margin"] == pytest.approx(float(logits[top2[0]] - logits[top2[1]]), abs=1e-4)
    assert m["ulp"] == 2.0 ** (math.floor(math.log2(abs(float(logits[top2[0]])))) - 23)  # float32
    assert 0 <= m["noise"] < 1e-3  # float32: a full pass and a cached step agree closely
    assert m["near_tie"] == (abs(m["margin"]) <= max(2 * m["ulp"], 2 * m["noise"]))
    assert local.margin(prompt, [], top2[0], top2[0])["near_tie"]
    assert not local.margin(prompt, [], top2[0], int(logits.argmin()))["near_tie"]


def test_bench_tiny_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "bench", "latency", "--tiny", "--prompts", "2",
         "--max-new-tokens", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hardware split" in proc.stdout and "| contender" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert (out / "chart.png").stat().st_size > 1000
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["config"]["contenders"]) == set(CONTENDERS)
    runs = set(res["aggregates"])
    assert runs >= {"ar", "sd", "pearl", "ar-local-1t", "ar-local-all"}
    assert runs >= {f"hf-assisted-{t}:{s}" for t in ("1t", "all") for s in ("default", "fixed")}
    assert {r["contender"].split(" ")[0] for r in res["table"]} == set(CONTENDERS)
    for row in res["table"]:
        for key in ("tokens_per_s", "speedup", "tokens_per_target_forward", "peak_rss",
                    "identical"):
            assert row.get(key) is not None, (row["contender"], key)
        assert row["identical"] is True, row["contender"]  # greedy: token-identical
    for mode in SERVICE:
        agg = res["aggregates"][mode]
        for key in ("overlap_ratio", "target_idle_frac", "draft_idle_frac", "overhead_share",
                    "overhead_per_round_ms_p50", "overhead_per_round_ms_p99"):
            assert agg[key] is not None and agg[key] >= 0, (mode, key)
    for mode in ("sd", "pearl"):
        assert 0 < res["aggregates"][mode]["acceptance_rate"] <= 1
        assert res["aggregates"][mode]["mean_accepted_tokens"] > 0
    # 4 prompts (2 per set) x every run, each with tokens and timings
    assert len(res["records"]) == 4 * len(runs)
    assert all(r["new_tokens"] == 8 and r["wall_s"] > 0 for r in res["records"])
    # the fixed hf-assisted window took effect: ~gamma draft forwards per target forward
    fixed = res["aggregates"]["hf-assisted-1t:fixed"]["drafted_per_target_forward"]
    assert 2 <= fixed <= 3
    t = res["timing"]["by_run"]["pearl"]  # as the services measured them in the pearl runs
    assert t["t_draft"] > 0 and 2 in {int(m) for m in t["t_forward"]}
    assert 0 <= res["timing"]["alpha_teacher_forced"] <= 1
    assert res["ceiling"]["ceiling_tokens_per_s"] > 0
    assert res["ceiling"]["pearl_fraction_of_ceiling"] > 0
    for r in res["records"]:
        if r["run"] in SERVICE:  # every request reports its prefill and forward times
            assert r["prefill_s"] > 0 and r["target_forward_times"], r["run"]
    for name in ("humaneval", "prose", "all"):  # the ceiling includes the prefill
        c = res["ceiling"]["by_set"][name]
        assert 0 < c["ceiling_tokens_per_s"] < c["decode_ceiling_tokens_per_s"]
    goals = res["goals"]
    assert goals["set"] == "humaneval"
    for name in ("pearl / sd", "pearl / hf-assisted-1t", "pearl / hf-assisted-all",
                 "protocol overhead", "fraction of ceiling"):
        assert goals[name]["value"] > 0 and isinstance(goals[name]["met"], bool), name
    assert "speed goals" in proc.stdout


def test_one_hardware_split_for_every_bench():
    from benchmarks.hardware import ALL_CPUS, hardware_split
    from benchmarks.latency_run import LOCAL

    split = hardware_split(("hf-cb-1t", "hf-cb-all"), False, "cpu", "bfloat16", None)
    last = ALL_CPUS[-1]
    assert f"draft service: CPU {ALL_CPUS[0]}, target service: CPU {last}" in split
    assert f"hf-cb-1t: CPU {last}, 1 thread; hf-cb-all: CPUs" in split and "bfloat16" in split
    assert "hf-assisted-1t / ar-local-1t:" in hardware_split(LOCAL, False, "cpu", "bf16", None)
    gpu = hardware_split(LOCAL, False, "cuda", "bfloat16", 0.8)
    assert "sharing the one GPU" in gpu and "acceptance is CHOSEN" in gpu
    assert hardware_split(LOCAL, True, "cpu", "float32", None).startswith("--tiny")


def test_latency_divergences_in_the_shared_words():
    from benchmarks.latency_report import divergences_text

    tie = {"near_tie": True, "reference_id": 1, "other_id": 2, "reference_logit": 9.0,
           "other_logit": 9.0, "margin": 0.0, "cached_margin": 0.0, "noise": 0.01, "ulp": 0.03}
    records = [{"run": "pearl", "set": "prose", "prompt": 3, "first_difference": 5,
                "divergence": tie},
               {"run": "sd", "set": "prose", "prompt": 4, "first_difference": 2,
                "divergence": {**tie, "near_tie": False, "margin": 3.0}}]
    text = divergences_text(records)
    assert "  pearl prose[3] new token 5: reference 1 logit 9.0000, this 2 logit" in text
    assert "margin 0.0000 (cached step 0.0000), noise 0.0100, ulp 0.0300: near-tie" in text
    assert "!!! 1 divergence(s) NOT a near-tie" in text and "!!! sd prose[4] new token 2" in text
    assert divergences_text([]) == ""
