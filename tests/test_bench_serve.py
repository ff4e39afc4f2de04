"""`pearl bench serve`: the open-loop bench's arrivals, workload, open loop, figures and command
line (fast), and one short run on the real pair (slow)."""

import json
import statistics
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.serve import CONTENDERS, conversation, open_loop, parse
from benchmarks.serve_report import Turn, markdown, met, record, summarize
from benchmarks.workload import (DEFAULT_MIX, KINDS, Arrival, arrival_times, first_turn,
                                 function_names, parse_mix, second_turn, system_prompt, workload)

PROMPTS = [{"index": i, "text": f"def f{i}(x):\n    \"\"\"Problem {i}.\"\"\"\n", "ids": [i, 1, 2]}
           for i in range(10)]
SLO = {"ttft_slo": 1.0, "tpot_slo": 0.1}


# -- arrivals -------------------------------------------------------------------------------------


def test_poisson_arrivals_seeded_at_the_mean_rate():
    times = arrival_times(4.0, seed=7, n=20000)
    assert times == arrival_times(4.0, seed=7, n=20000)  # seeded
    assert times != arrival_times(4.0, seed=8, n=20000)
    assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:]))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)  # 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean
    # memoryless: about e^-1 of the gaps are longer than the mean
    assert sum(g > 0.25 for g in gaps) / len(gaps) == pytest.approx(0.368, abs=0.02)


def test_arrivals_scale_with_the_rate_and_stop_at_the_duration():
    slow, fast = arrival_times(0.5, 3, n=50), arrival_times(2.0, 3, n=50)
    assert fast == pytest.approx([t / 4 for t in slow])  # the same pattern, four times as dense
    within = arrival_times(2.0, 3, duration=10.0)
    assert within and max(within) < 10.0
    assert within == fast[:len(within)] and fast[len(within)] >= 10.0
    for bad in ({"rate": 0, "seed": 0, "n": 3}, {"rate": 1, "seed": 0},
                {"rate": 1, "seed": 0, "n": 3, "duration": 2.0}):
        with pytest.raises(ValueError):
            arrival_times(**bad)


# -- the workload ---------------------------------------------------------------------------------


def test_mix_parsing():
    assert parse_mix(DEFAULT_MIX) == dict.fromkeys(KINDS, 1.0)
    assert parse_mix("two-turn=2, humaneval=0.5") == {"two-turn": 2.0, "humaneval": 0.5}
    for bad in ("chat=1", "humaneval", "humaneval=x", "humaneval=-1", "humaneval=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_workload_is_deterministic_and_keeps_the_mix():
    times = arrival_times(1.0, 5, n=300)
    mix = parse_mix(DEFAULT_MIX)
    w = workload(times, mix, 5, len(PROMPTS), ["f0", "f1"])
    assert w == workload(times, mix, 5, len(PROMPTS), ["f0", "f1"])
    assert w != workload(times, mix, 6, len(PROMPTS), ["f0", "f1"])
    kinds = [x.kind for x in w]
    for i in range(0, 300, 3):  # 1:1:1: every kind once in each three
        assert sorted(kinds[i:i + 3]) == sorted(KINDS)
    assert len(set(tuple(kinds[i:i + 3]) for i in range(0, 300, 3))) > 1  # not one fixed order
    # the i-th request is the same at every rate
    other = workload(arrival_times(3.0, 5, n=300), mix, 5, len(PROMPTS), ["f0", "f1"])
    assert [(x.kind, x.prompt, x.question, x.follow_up) for x in other] == \
        [(x.kind, x.prompt, x.question, x.follow_up) for x in w]
    for x in w:
        assert (x.prompt is None) == (x.kind == "shared-system")
        assert (x.question is not None) == (x.kind == "shared-system")
        assert (x.follow_up is not None) == (x.kind == "two-turn")
        assert x.question is None or "`f0`" in x.question or "`f1`" in x.question
    uneven = [x.kind for x in workload(arrival_times(1.0, 1, n=400),
                                       parse_mix("humaneval=1,two-turn=3"), 1, 10, ["f"])]
    assert uneven.count("humaneval") == 100 and uneven.count("two-turn") == 300


def test_system_prompt_and_turns():
    words = lambda s: len(s.split())  # noqa: E731
    texts = [p["text"] for p in PROMPTS]
    system = system_prompt(texts, 30, words)
    assert system == system_prompt(texts, 30, words) and words(system) >= 30
    assert function_names(system) == [f"f{i}" for i in range(len(function_names(system)))]
    assert 1 < len(function_names(system)) < len(PROMPTS)  # stops once long enough
    he = Arrival(0, 0.0, "humaneval", prompt=3)
    assert first_turn(he, system, PROMPTS) == PROMPTS[3]["text"]
    assert first_turn(he, system, PROMPTS, "007") == "# session 007\n" + PROMPTS[3]["text"]
    shared = Arrival(1, 0.0, "shared-system", question="Why?")
    assert first_turn(shared, system, PROMPTS) == [{"role": "system", "content": system},
                                                   {"role": "user", "content": "Why?"}]
    assert first_turn(shared, system, PROMPTS, "007")[0]["content"] == "(session 007) " + system
    two = Arrival(2, 0.0, "two-turn", prompt=4, follow_up="Shorter?")
    one = first_turn(two, system, PROMPTS, "007")
    assert [m["role"] for m in one] == ["user"] and "def f4" in one[0]["content"]
    assert one[0]["content"].startswith("(session 007) ")
    assert second_turn(two, PROMPTS, "ANSWER", "007") == [  # turn 1 as it was sent: reusable
        *one, {"role": "assistant", "content": "ANSWER"}, {"role": "user", "content": "Shorter?"}]


# -- the open loop --------------------------------------------------------------------------------


def test_open_loop_sends_at_arrival_times_whatever_is_running():
    """Requests that take 0.6 s each, arriving 0.1 s apart: each is sent on time, all four run
    at once (a closed loop of one would send the last at 1.8 s)."""
    arrivals = [Arrival(i, 0.1 * i, "humaneval", prompt=0) for i in range(4)]
    running, most, lock = [0], [0], threading.Lock()

    def run(arr, t0):
        sent = time.perf_counter() - t0
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.6)
        with lock:
            running[0] -= 1
        return [{"request": arr.index, "sent": sent}]

    recs = open_loop(arrivals, run)
    assert [r["request"] for r in recs] == [0, 1, 2, 3]
    for r, arr in zip(recs, arrivals):
        assert arr.at <= r["sent"] < arr.at + 0.08
    assert most[0] == 4


def test_two_turns_follow_each_other_with_the_answer():
    sent = []

    def send(payload, seed, t0):
        at = time.perf_counter() - t0
        sent.append((payload, seed, at))
        time.sleep(0.05)
        return Turn(at, at + 0.01, time.perf_counter() - t0, [5, 6, 7], f"answer {seed}",
                    {"cached_prompt_tokens": 9})

    two = Arrival(3, 0.0, "two-turn", prompt=1, follow_up="More?")
    recs = conversation("pearl", 1.0, send, "SYS", PROMPTS, "012")(two, time.perf_counter())
    assert [r["turn"] for r in recs] == [1, 2] and [s[1] for s in sent] == [6, 7]
    assert sent[1][0][:2] == [*sent[0][0], {"role": "assistant", "content": "answer 6"}]
    assert sent[0][0][0]["content"].startswith("(session 012) ")
    assert recs[1]["arrival_s"] == recs[0]["end_s"] <= recs[1]["sent_s"]
    assert all(r["cached_prompt_tokens"] == 9 and r["kind"] == "two-turn" for r in recs)


# -- figures --------------------------------------------------------------------------------------


def synthetic(i: int, ttft: float, tpot: float, n: int = 11, error: str | None = None) -> dict:
    """Arrival i at i seconds, sent then, first token ttft later, n tokens tpot apart."""
    first = i + ttft
    t = Turn(float(i), first, first + tpot * (n - 1), list(range(n)), "x", {}, error)
    return record("ar", 1.0, Arrival(i, float(i), "humaneval", prompt=0), 1, float(i), t)


def test_record_and_slo():
    r = synthetic(2, 0.5, 0.05)
    assert r["ttft_s"] == pytest.approx(0.5) and r["tpot_s"] == pytest.approx(0.05)
    assert r["latency_s"] == pytest.approx(1.0) and r["cached_prompt_tokens"] == 0
    assert met(r, **SLO) and not met(synthetic(0, 1.5, 0.05), **SLO)
    assert not met(synthetic(0, 0.5, 0.2), **SLO)
    one = synthetic(0, 0.5, 0.0, n=1)
    assert one["tpot_s"] is None and met(one, **SLO)  # no TPOT to miss
    assert not met(synthetic(0, 0.5, 0.05, error="boom"), **SLO)


def test_summary_percentiles_throughput_and_goodput():
    ttfts = [0.2, 0.4, 0.6, 0.8, 2.0]  # the last misses the TTFT SLO
    tpots = [0.05, 0.05, 0.05, 0.3, 0.05]  # the fourth misses the TPOT SLO
    recs = [synthetic(i, ttft, tpot) for i, (ttft, tpot) in enumerate(zip(ttfts, tpots))]
    recs.append(synthetic(5, 0.1, 0.05, error="UNAVAILABLE"))
    s = summarize(recs, 1.0, 0.1)
    wall = 6.8  # from the first arrival (0) to the last end (arrival 3: 3 + 0.8 + 10 * 0.3)
    assert s["wall_s"] == pytest.approx(wall)
    assert s["requests"] == 6 and s["errors"] == 1 and s["slo_met"] == 3
    assert s["goodput_rps"] == pytest.approx(3 / wall)
    assert s["requests_per_s"] == pytest.approx(5 / wall)
    assert s["tokens_per_s"] == pytest.approx(55 / wall)  # the failed request's tokens left out
    assert s["ttft_p50_s"] == pytest.approx(0.6) and s["ttft_p99_s"] == pytest.approx(1.952)
    assert s["tpot_p50_s"] == pytest.approx(0.05) and s["tpot_p99_s"] == pytest.approx(0.29)
    lat = sorted(t + 10 * p for t, p in zip(ttfts, tpots))
    assert s["latency_p50_s"] == pytest.approx(lat[2])
    assert s["offered_rps"] == pytest.approx(1.0) and s["max_send_lag_s"] == 0
    assert s["ttft_p50_by_kind_s"] == {"humaneval": pytest.approx(0.6)}
    table = markdown({"ar": {1.0: s}}, 1.0, 0.1)
    assert "| ar | 1 | 0.60 / 1.95 | 50 / 290 |" in table and "TTFT <= 1 s, TPOT <= 100 ms" in table


# -- command line ---------------------------------------------------------------------------------


def test_bench_serve_help():
    proc = subprocess.run([sys.executable, "-m", "pearl.cli", "bench", "serve", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--request-rate", "--num-requests", "--duration-s", "--mix", "--ttft-slo-s",
                 "--tpot-slo-s", "--temperature", "--seed", "--json", "--chart"):
        assert flag in proc.stdout


def test_bench_subcommands_dispatch(monkeypatch):
    import benchmarks.latency
    import benchmarks.load
    import benchmarks.serve
    from pearl import cli

    seen = {}
    monkeypatch.setattr(benchmarks.serve, "run", lambda a: seen.setdefault("serve", a) and 0)
    monkeypatch.setattr(benchmarks.load, "run", lambda a: seen.setdefault("load", a) and 0)
    monkeypatch.setattr(benchmarks.latency, "run", lambda a: seen.setdefault("one", a) and 0)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve", "--request-rate", "2,0.5", "--num-requests", "3",
                  "--contenders", "ar,hf-cb-all", "--max-new-tokens", "8"])
    assert e.value.code == 0
    a = seen["serve"]
    assert (a.request_rate, a.num_requests, a.max_new_tokens) == ("2,0.5", 3, 8)
    assert parse(a) == (["ar", "hf-cb-all"], [0.5, 2.0], parse_mix(DEFAULT_MIX))
    with pytest.raises(SystemExit):
        cli.main(["bench", "load", "--concurrency", "1,2", "--tiny"])
    assert seen["load"].concurrency == "1,2" and seen["load"].max_new_tokens == 48
    with pytest.raises(SystemExit):
        cli.main(["bench", "latency", "--tiny"])
    assert seen["one"].tiny and not getattr(seen["one"], "bench_kind", None)
    for flags in (["--contenders", "ar,vllm"], ["--request-rate", "0"],
                  ["--request-rate", "fast"], ["--num-requests", "0"]):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(["bench", "serve", *flags])
        with pytest.raises(ValueError):
            parse(seen["serve"])
    assert set(CONTENDERS) == {"ar", "sd", "pearl", "hidden-transfer", "hf-cb-1t", "hf-cb-all"}


# -- the real pair --------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_serve_real_pair(tmp_path):
    """Four requests (every kind: 1:1:1 gives each once in three) at 0.5 requests/s, 8 new
    tokens, ar and pearl through the real services."""
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "bench", "serve", "--request-rate", "0.5",
         "--num-requests", "4", "--max-new-tokens", "8", "--contenders", "ar,pearl",
         "--system-tokens", "300", "--json", str(out), "--chart", str(png)],
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["phases"]) == {"ar", "pearl"} and res["config"]["rates"] == [0.5]
    recs = res["records"]
    for name in ("ar", "pearl"):
        mine = [r for r in recs if r["contender"] == name]
        assert {r["kind"] for r in mine} == set(KINDS)
        assert len(mine) == 4 + sum(r["kind"] == "two-turn" for r in mine) // 2
        for r in mine:
            assert r["error"] is None, r
            assert r["new_tokens"] >= 1 and r["ttft_s"] > 0 and r["latency_s"] >= r["ttft_s"]
            assert r["tpot_s"] is None if r["new_tokens"] == 1 else r["tpot_s"] > 0
            assert r["cached_prompt_tokens"] >= 0 and r["prompt_tokens"] > 0
        s = res["phases"][name]["0.5"]
        assert s["ttft_p50_s"] > 0 and s["tokens_per_s"] > 0 and s["requests"] == len(mine)
    assert "| **pearl** | 0.5 |" in proc.stdout
