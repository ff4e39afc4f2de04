"""`pearl bench load`: the load bench's harness on tiny models (not a speed test), its
goal checks and the command's dispatch."""

import json
import re
import subprocess
import sys

import pytest

from benchmarks.load import DEFAULTS
from benchmarks.load_analysis import (Margins, divergence_goal, goals, kv_from_config,
                                      mark_divergences, mark_identical)
from benchmarks.load_report import divergences_text, goals_text

GOAL_NAMES = ["pearl at 4 concurrent / pearl one at a time",
              "pearl at 8 concurrent / pearl one at a time",
              "pearl / hf-padded-1t at 4 concurrent", "pearl / hf-padded-all at 8 concurrent",
              "pearl / ar (same services) at 1 concurrent",
              "pearl / ar (same services) at 2 concurrent",
              "pearl p99 latency at 8 concurrent / one request alone", "RSS growth over a"]


def test_load_bench_tiny_run(tmp_path):
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "bench", "load", "--concurrency", "1,2", "--tiny",
         "--contenders", "ar,pearl,hf-padded-1t", "--max-new-tokens", "6", "--rss-check",
         "--rss-requests", "24", "--json", str(out), "--chart", str(png)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert res["config"]["concurrency"] == [1, 2]
    assert set(res["phases"]) == {"ar", "pearl", "hf-padded-1t"}
    for name, by_c in res["phases"].items():
        assert set(by_c) == {"1", "2"}, name
        for c, s in by_c.items():
            assert s["requests"] == 2 * int(c), (name, c)  # c clients x 2 requests each
            for key in ("tokens_per_s", "wall_s", "latency_p50_s", "latency_p99_s",
                        "latency_mean_s", "ttft_p50_s", "ttft_p99_s"):
                assert s[key] is not None and s[key] > 0, (name, c, key)
            assert s["latency_p50_s"] <= s["latency_p99_s"]
            assert s["ttft_p50_s"] <= s["latency_p99_s"]
            assert s["new_tokens"] == 6 * s["requests"]  # random tiny models: no EOS
    # greedy float32: the services and the left-padded batch give ar's tokens on every prompt
    assert res["config"]["reference"] == "ar"
    assert res["phases"]["pearl"]["2"]["identical_share"] == 1.0
    assert res["phases"]["hf-padded-1t"]["2"]["identical_share"] == 1.0
    # the noisy tiny draft's own acceptance (test_load_bench_with_a_replaying_draft's contrast)
    assert all(s["acceptance_rate_mean"] >= 0.7 for s in res["phases"]["pearl"].values())
    # engine statistics of every service request (GenerateStats), in the records and the table
    for r in res["records"]:
        if r["contender"] in ("ar", "pearl"):
            assert r["queue_wait_s"] >= 0 and r["mean_target_batch"] >= 1, r
            assert r["contender"] == "ar" or r["gamma_history"], r
        else:
            assert "queue_wait_s" not in r and "mean_target_batch" not in r, r
    for name in ("ar", "pearl"):
        for s in res["phases"][name].values():
            assert s["mean_target_batch"] >= 1 and s["queue_wait_mean_s"] >= 0
    head = next(x for x in proc.stdout.splitlines() if x.startswith("| contender    | c "))
    assert "| tgt batch |" in head and "| queue wait s |" in head
    # divergences from ar alone: compared, none in float32, the goal line met
    div = res["divergences"]
    assert div["reference"] == "ar" and div["divergences"] == 0
    # all but ar's references: prompts 0 and 1 alone, 2 and 3 at concurrency 2 (its lowest)
    assert div["compared"] == len(res["records"]) - 4
    assert div["against_alone"] == 10  # prompts 0 and 1 in the other 5 phases
    assert not any(r.get("divergence") for r in res["records"])
    goal = next(g for g in res["goals"] if g["goal"] == "float32 divergences are near-ties")
    assert goal["met"] is True
    assert re.search(r"float32 divergences are near-ties: 0 of \d+ greedy .*: met$",
                     proc.stdout, re.M)
    # the requests of a phase overlap in time, each has its own prompt
    two = [r for r in res["records"] if r["contender"] == "pearl" and r["concurrency"] == 2]
    assert len({r["prompt"] for r in two}) == 4
    firsts = [min((r for r in two if r["client"] == i), key=lambda r: r["start"]) for i in (0, 1)]
    assert max(r["start"] for r in firsts) < min(r["end"] for r in firsts)
    kv = res["kv_bytes_per_token"]["target"]
    from specdec.models import tiny_loaded

    assert kv["bytes"] == kv_from_config(tiny_loaded(2).model.config, "float32")
    assert res["rss"]["requests"] == 24 and res["rss"]["growth"]
    assert "| contender | tok/s at 1 | tok/s at 2 |" in res["table_md"]
    assert res["table_md"] in proc.stdout
    text = proc.stdout.split("goals of issue 12")[1]
    for name in GOAL_NAMES:
        assert name in text, name
    for name in ("pearl / ar (same services) at 1 concurrent", "RSS growth over a 24-request"):
        line = next(x for x in text.splitlines() if name in x)
        assert re.search(r"goal (>=|<=) .*: (met|NOT met)$", line), line
    assert "not measured (needs pearl at concurrency 1 and 8)" in text
    assert {g["goal"] for g in res["goals"]} >= {g for g in GOAL_NAMES if "RSS" not in g
                                                  and "p99" not in g}


def test_load_bench_http_contender(tmp_path):
    """pearl-http: pearl through the coordinator's HTTP front beside pearl over gRPC, the same
    prompts; TTFT and TPOT for every service contender; the HTTP goal line. HTTP streams text:
    its records hold the text and the usage chunk's token count, no ids."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "bench", "load", "--concurrency", "1,2", "--tiny",
         "--contenders", "ar,pearl,pearl-http", "--max-new-tokens", "6", "--json", str(out),
         "--chart", str(tmp_path / "load.png")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name in ("ar", "pearl", "pearl-http"):
        for c, s in res["phases"][name].items():
            assert s["requests"] == 2 * int(c) and s["new_tokens"] == 6 * s["requests"]
            for key in ("ttft", "tpot"):
                assert 0 < s[f"{key}_p50_s"] <= s[f"{key}_p99_s"], (name, c, key)
            assert s["tpot_p99_s"] < s["latency_p99_s"]
    for r in res["records"]:
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0, r
        assert r["tpot_s"] == pytest.approx((r["end"] - r["start"] - r["ttft_s"]) / 5)
    # the same prompts, the same output as pearl over gRPC (and as ar): text and token count
    grpc = {(r["prompt"], r["concurrency"]): r for r in res["records"] if r["contender"] == "pearl"}
    http = [r for r in res["records"] if r["contender"] == "pearl-http"]
    assert {(r["prompt"], r["concurrency"]) for r in http} == set(grpc)
    for r in http:
        twin = grpc[(r["prompt"], r["concurrency"])]
        assert r["token_ids"] is None and r["prompt_tokens"] == twin["prompt_tokens"]
        assert r["text"] == twin["text"] and r["new_tokens"] == len(twin["token_ids"]), r
        assert r["acceptance_rate"] is not None and r["finish_reason"] == "length"
    assert all(s["identical_share"] == 1.0 for s in res["phases"]["pearl-http"].values())
    assert res["divergences"]["divergences"] == 0
    head = next(x for x in proc.stdout.splitlines() if x.startswith("| contender  | c "))
    assert "| TTFT p99 s | TPOT p50 ms | TPOT p99 ms |" in head
    assert "| TTFT p50 / p99 s at 2 | TPOT p50 / p99 ms at 2 |" in res["table_md"]
    goal = next(g for g in res["goals"] if g["goal"].startswith("pearl-http / pearl"))
    at2 = {n: res["phases"][n]["2"]["tokens_per_s"] for n in ("pearl", "pearl-http")}
    assert goal["target"] == 0.98
    assert goal["value"] == pytest.approx(at2["pearl-http"] / at2["pearl"])
    assert re.search(r"^  pearl-http / pearl \(HTTP against gRPC\) at 2 concurrent: \d+\.\d\dx "
                     r"\([\d.]+ / [\d.]+ tok/s; goal >= 0\.98x\): (met|NOT met)$",
                     proc.stdout, re.M)


def test_http_goal_only_with_both_contenders():
    def ph(rate):
        return {"tokens_per_s": rate, "latency_p50_s": 1.0, "latency_p99_s": 1.0}

    name = "pearl-http / pearl (HTTP against gRPC) at 8 concurrent"
    by = {g["goal"]: g for g in goals({"pearl": {1: ph(5), 8: ph(20)},
                                       "pearl-http": {1: ph(5), 8: ph(19.7)}}, [1, 8], None)}
    assert by[name]["value"] == pytest.approx(0.985) and by[name]["met"] is True
    by = {g["goal"]: g for g in goals({"pearl": {8: ph(20)}, "pearl-http": {8: ph(19)}}, [8],
                                      None)}
    assert by[name]["met"] is False  # 0.95 < 0.98
    assert not any("pearl-http" in g["goal"] for g in goals({"pearl": {8: ph(20)}}, [8], None))


def test_http_records_compared_by_text():
    """A record with text and no ids (HTTP) is identical when its text and token count equal the
    reference's decoded; a difference is reported, with nothing to weigh it by."""
    def rec(contender, c, tokens=None, text=None, n=None):
        return {"contender": contender, "concurrency": c, "prompt": 0, "token_ids": tokens,
                "text": text, "new_tokens": len(tokens) if tokens else n}

    decode = lambda ids: "".join(chr(96 + t) for t in ids)  # noqa: E731
    records = [rec("ar", 1, [1, 2, 3]), rec("pearl-http", 2, text="abc", n=3),
               rec("pearl-http", 4, text="abd", n=3), rec("pearl-http", 8, text="abc", n=2)]
    mark_identical(records, "ar", decode)
    assert [r["identical"] for r in records] == [None, True, False, False]
    assert [r["first_difference"] for r in records] == [None, None, 2, 3]
    summary = mark_divergences(records, "ar", {0: [5]}, lambda *a: pytest.fail("weighed"))
    assert summary["divergences"] == 2 and summary["near_ties"] == 0
    assert records[2]["divergence"]["near_tie"] is None
    assert "no token ids to weigh" in records[2]["divergence"]["note"]


def test_load_bench_with_a_replaying_draft(tmp_path):
    """--replay-acceptance in the load bench: the target service's greedy continuations of every
    prompt go to --out/replay.jsonl and the draft replays them. The tiny noisy draft alone
    accepts ~0.9 of its tokens (test_load_bench_tiny_run); replaying at 0.3 it must accept about
    what a window of 3 accepts at 0.3 per token ((.3 + .09 + .027) / 3 = 0.14); the output stays
    ar's."""
    out, chosen = tmp_path / "load.json", 0.3
    proc = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "bench", "load", "--concurrency", "1,2", "--tiny",
         "--contenders", "ar,sd,pearl", "--max-new-tokens", "12", "--replay-acceptance",
         str(chosen), "--json", str(out), "--chart", str(tmp_path / "load.png"),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    refs = [json.loads(x) for x in (tmp_path / "replay.jsonl").read_text().splitlines()]
    assert len(refs) == 16  # every prompt the load bench uses (at least 16)
    for r in res["records"]:  # each reference: prompt + the target's own greedy tokens, and more
        n = r["prompt_tokens"]
        assert any(len(x) > n + 12 and x[n:n + 12] == r["token_ids"] for x in refs), r["prompt"]
    for name in ("sd", "pearl"):
        for c, s in res["phases"][name].items():
            assert s["identical_share"] == 1.0, (name, c)  # lossless: ar's tokens
            # pearl's adaptive window may back off to 0 at so low an acceptance (its goodput
            # rule, coordinator/schedule.py Timing): then it drafts nothing and accepts nothing
            low = 0.03 if name == "sd" else 0.0
            assert low <= s["acceptance_rate_mean"] <= 0.4, (name, c, s["acceptance_rate_mean"])
    assert "acceptance_rate_mean" not in res["phases"]["ar"]["1"]
    assert res["config"]["replay_acceptance"] == chosen
    assert res["config"]["acceptance"].startswith("chosen: ")
    assert "--replay-acceptance 0.3" in res["config"]["command"]
    assert "acceptance is CHOSEN, not a real pair's" in res["config"]["hardware_split"]
    assert re.search(r"^NOTE: the draft replays .* acceptance is CHOSEN", proc.stdout, re.M)


def test_goals_met_and_not_met():
    def ph(rate, p50=10.0, p99=10.0):
        return {"tokens_per_s": rate, "latency_p50_s": p50, "latency_p99_s": p99}

    phases = {"pearl": {1: ph(10, p50=5), 4: ph(35), 8: ph(40, p99=16)},
              "ar": {1: ph(9), 4: ph(36), 8: ph(30)},
              "hf-padded-1t": {4: ph(20), 8: ph(30)}, "hf-padded-all": {4: ph(30), 8: ph(30)}}
    rss = {"requests": 200, "after_first_mb": {"target": 1000.0, "draft": 500.0},
           "at_end_mb": {"target": 1050.0, "draft": 600.0},
           "growth": {"target": 0.05, "draft": 0.2}}
    by = {g["goal"]: g for g in goals(phases, [1, 4, 8], rss)}
    assert by["pearl at 4 concurrent / pearl one at a time"]["met"] is True  # 3.5x >= 3
    assert by["pearl at 8 concurrent / pearl one at a time"]["met"] is False  # 4x < 5
    assert by["pearl / hf-padded-1t at 4 concurrent"]["value"] == pytest.approx(1.75)
    assert by["pearl / hf-padded-1t at 4 concurrent"]["met"] is True
    assert by["pearl / hf-padded-1t at 8 concurrent"]["met"] is False  # 1.33 < 1.5
    assert by["pearl / hf-padded-all at 4 concurrent"]["met"] is False  # 1.17 < 1.2
    assert by["pearl / ar (same services) at 4 concurrent"]["met"] is False  # 35 < 36
    assert by["pearl / ar (same services) at 8 concurrent"]["met"] is True
    lat = by["pearl p99 latency at 8 concurrent / one request alone (p50 at 1)"]
    assert lat["value"] == pytest.approx(3.2) and lat["met"] is False
    worst = next(g for g in by.values() if g["goal"].startswith("RSS"))
    assert "draft" in worst["goal"] and worst["met"] is False
    assert all(g["met"] is None for g in goals({}, [1], None))


def test_kv_bytes_from_config():
    from transformers import Qwen2Config

    from specdec.models import SHAPES

    cfg = Qwen2Config(**SHAPES["qwen2.5-1.5b"])  # 28 layers, 2 KV heads of 1536/12 = 128
    assert kv_from_config(cfg, "bfloat16") == 2 * 28 * 2 * 128 * 2
    assert kv_from_config(cfg, "float32") == 2 * 28 * 2 * 128 * 4


def test_each_bench_takes_its_own_defaults(monkeypatch):
    import benchmarks.latency
    import benchmarks.load
    from pearl import cli

    seen = {}
    monkeypatch.setattr(benchmarks.latency, "run", lambda a: seen.setdefault("one", a) and 0)
    monkeypatch.setattr(benchmarks.load, "run", lambda a: seen.setdefault("load", a) and 0)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "latency", "--tiny"])
    assert e.value.code == 0
    one = seen["one"]
    assert one.max_new_tokens is not None and one.max_new_tokens != DEFAULTS["max_new_tokens"]
    assert "hf-padded-1t" not in one.contenders  # the one-request bench's own defaults
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "load", "--concurrency", "1,2", "--tiny"])
    assert e.value.code == 0
    assert seen["load"].max_new_tokens == DEFAULTS["max_new_tokens"]
    assert seen["load"].contenders == DEFAULTS["contenders"]


def test_divergences_weighed_with_the_target():
    """A record whose tokens differ from ar's alone gets the target's margin at the first
    difference; a token the target does not prefer is NOT a near-tie, loudly; the goal fails."""
    import torch

    from specdec.models import tiny_loaded

    target = tiny_loaded(2)
    prompt = [5, 9, 2, 7, 3, 11, 4]
    with torch.inference_mode():
        out = target.model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)
    greedy = out[0, len(prompt):].tolist()
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + greedy[:2]])).logits[0, -1]
    worst = int(logits.argmin())  # the target's least likely token after the common prefix
    assert worst != greedy[2]
    off = greedy[:2] + [worst] + greedy[3:]

    def rec(contender, c, tokens, prompt_index=0):
        return {"contender": contender, "concurrency": c, "prompt": prompt_index,
                "token_ids": tokens}

    records = [rec("pearl", 2, greedy), rec("ar", 2, greedy),  # batched before alone: still ar
               rec("ar", 1, greedy), rec("hf-padded-1t", 2, off), rec("pearl", 4, greedy[:3]),
               rec("sd", 2, off, prompt_index=1)]  # no reference for prompt 1
    mark_identical(records, "ar")
    summary = mark_divergences(records, "ar", {0: prompt, 1: prompt},
                               Margins(target, "unused", "cpu", "float32"))
    assert summary == {"reference": "ar", "compared": 4, "against_alone": 4, "divergences": 2,
                       "near_ties": 0}
    assert [r["identical"] for r in records] == [True, True, None, False, False, None]
    v = records[3]["divergence"]
    assert (v["position"], v["reference_id"], v["other_id"]) == (2, greedy[2], worst)
    assert v["reference_concurrency"] == 1 and v["near_tie"] is False
    assert v["margin"] == pytest.approx(float(logits[greedy[2]] - logits[worst]), rel=1e-4)
    assert v["margin"] > 2 * v["noise"]
    short = records[4]["divergence"]  # a prefix of ar's tokens: nothing to weigh, not a tie
    assert short["position"] == 3 and short["near_tie"] is None
    assert all("divergence" not in r for r in records[:3] + records[5:])
    text = divergences_text(records, summary)
    assert "hf-padded-1t x2 prompt 0 new token 2" in text and "!!! 2 divergence(s)" in text
    goal = divergence_goal(summary, "bfloat16")
    assert goal["goal"] == "bf16 divergences are near-ties" and goal["met"] is False
    assert goals_text([goal], "cmd").splitlines()[-1].endswith(": NOT met")

    # a margin the check calls a near-tie: reported, not loud, and the goal is met
    calls = []

    def tie(*args):
        calls.append(args)
        return {"near_tie": True, "reference_id": args[2], "other_id": args[3], "margin": 0.0,
                "reference_logit": 1.0, "other_logit": 1.0, "noise": 0.01, "ulp": 0.01}

    records = [rec("ar", 1, greedy), rec("sd", 8, off)]
    mark_identical(records, "ar")
    summary = mark_divergences(records, "ar", {0: prompt}, tie)
    assert calls == [(prompt, greedy[:2], greedy[2], worst)]
    assert summary["divergences"] == summary["near_ties"] == 1
    assert "!!!" not in divergences_text(records, summary)
    assert divergence_goal(summary, "bfloat16")["met"] is True
    assert divergence_goal({"reference": None, "compared": 0, "divergences": 0,
                            "near_ties": 0}, "bfloat16")["met"] is None
