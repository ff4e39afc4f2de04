"""A/B of the engine's coalescing wait (--max-batch-wait-ms, docs/design.md section 12).

Two service sets side by side, identical but for the flag (`on`: the given wait, `off`: 0), each
a draft on the first CPU and a target on the last (one thread each) plus a coordinator. Every
phase (mode x concurrency) runs on both sets one after the other, the order swapped each round,
so that the machine's noise falls on both alike. Prints tok/s, mean target batch and queue wait
per request, and the on/off throughput ratio.

    .venv/bin/python scripts/coalesce_ab.py --concurrency 1,2,4,8 --modes ar,pearl \
        --max-new-tokens 24 --rounds 1
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pearl.bench import DEFAULT_MODELS, load_prompts  # noqa: E402
from pearl.bench_load import service_phase, summarize, tokenizer_only  # noqa: E402
from pearl.bench_local import ALL_CPUS  # noqa: E402
from pearl.procs import Services  # noqa: E402


def start_set(svcs: Services, a, wait_ms: float) -> None:
    common = ["--device", "cpu", "--dtype", a.dtype, "--threads", "1",
              "--kv-cache-tokens", str(a.kv_cache_tokens), "--max-batch-wait-ms", str(wait_ms)]
    svcs.start("draft", ["--model", a.draft_model, *common], cpus=str(ALL_CPUS[0]))
    svcs.start("target", ["--model", a.target_model, *common], cpus=str(ALL_CPUS[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--modes", default="ar,pearl")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=1, help="each phase runs this often per set")
    p.add_argument("--wait-ms", type=float, default=None,
                   help="the `on` set's --max-batch-wait-ms (default: the serve default)")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-tokens", type=int, default=8192)
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--json", default=None, help="write every phase's summary here")
    a = p.parse_args()
    from specdec.defaults import DEFAULT_MAX_BATCH_WAIT_MS

    wait_on = DEFAULT_MAX_BATCH_WAIT_MS if a.wait_ms is None else a.wait_ms
    concurrency = [int(c) for c in a.concurrency.split(",")]
    modes = a.modes.split(",")
    arms = {"on": Services(), "off": Services()}
    t0 = time.perf_counter()
    try:
        start_set(arms["on"], a, wait_on)
        start_set(arms["off"], a, 0.0)
        address = {}
        for name, svcs in arms.items():
            d, t = svcs.wait("draft"), svcs.wait("target")
            svcs.start("coordinator", ["--draft", d, "--target", t, "--gamma", str(a.gamma)])
            address[name] = svcs.wait("coordinator", 120)
        prompts = load_prompts("humaneval", max(concurrency), tokenizer_only(a.target_model)
                               .tokenizer, False)
        print(f"services up in {time.perf_counter() - t0:.0f} s; on = {wait_on:g} ms, off = 0",
              flush=True)
        results: list[dict] = []
        k = 0
        for c in concurrency:
            for mode in modes:
                for r in range(a.rounds):
                    order = ("on", "off") if k % 2 == 0 else ("off", "on")
                    k += 1
                    for arm in order:
                        recs = service_phase(address[arm], mode, c, prompts,
                                             a.max_new_tokens, a.gamma, 1, None)
                        s = summarize(recs)
                        batch = [x["mean_target_batch"] for x in recs if x["mean_target_batch"]]
                        row = {"arm": arm, "mode": mode, "concurrency": c, "round": r,
                               "tokens_per_s": s["tokens_per_s"],
                               "mean_target_batch": statistics.mean(batch) if batch else None,
                               "queue_wait_s": statistics.mean(x["queue_wait_s"] or 0
                                                               for x in recs),
                               "latency_p50_s": s["latency_p50_s"], "wall_s": s["wall_s"]}
                        results.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        for svcs in arms.values():
            svcs.stop()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print("| mode | concurrency | tok/s on | tok/s off | on/off | target batch on | off | "
          "queue wait s on | off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for c in concurrency:
            def mean(arm, key):
                v = [x[key] for x in results if x["arm"] == arm and x["mode"] == mode
                     and x["concurrency"] == c and x[key] is not None]
                return statistics.mean(v) if v else float("nan")
            on, off = mean("on", "tokens_per_s"), mean("off", "tokens_per_s")
            print(f"| {mode} | {c} | {on:.2f} | {off:.2f} | {on / off:.2f}x | "
                  f"{mean('on', 'mean_target_batch'):.2f} | {mean('off', 'mean_target_batch'):.2f}"
                  f" | {mean('on', 'queue_wait_s'):.1f} | {mean('off', 'queue_wait_s'):.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
