"""A/B of two service set-ups side by side, on the default pair (or any pair) on loopback.

Arm `a` is this checkout as it is. Arm `b` differs in one of two ways:

- `--wait-ms-b X`: its draft and target run with `--max-batch-wait-ms X` (the engine's coalescing
  wait, docs/design.md section 12); each arm then has its own draft, target and coordinator.
- `--rev-b REV`: its coordinator runs the code of git revision REV (a schedule change, section 4);
  both coordinators then share one draft and one target, so only the schedule differs.

Draft on the first CPU, target on the last, one thread each. Every phase (mode x concurrency) runs
on both arms one after the other, the order swapped each time, so the machine's noise falls on both
alike. Prints tok/s, mean target batch and queue wait per request, and the a/b throughput ratio.

    .venv/bin/python scripts/ab.py --rev-b HEAD --concurrency 1,4,8 --modes pearl --rounds 2
    .venv/bin/python scripts/ab.py --wait-ms-b 0 --concurrency 1,2,4,8 --modes ar,pearl
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pearl.bench import DEFAULT_MODELS, load_prompts  # noqa: E402
from pearl.bench_load import service_phase, summarize, tokenizer_only  # noqa: E402
from pearl.bench_local import ALL_CPUS  # noqa: E402
from pearl.procs import Services  # noqa: E402


def start_models(svcs: Services, a, wait_ms: float) -> tuple[str, str]:
    common = ["--device", "cpu", "--dtype", a.dtype, "--threads", "1",
              "--kv-cache-tokens", str(a.kv_cache_tokens), "--max-batch-wait-ms", str(wait_ms)]
    svcs.start("draft", ["--model", a.draft_model, *common], cpus=str(ALL_CPUS[0]))
    svcs.start("target", ["--model", a.target_model, *common], cpus=str(ALL_CPUS[-1]))
    return svcs.wait("draft"), svcs.wait("target")


def checkout(rev: str) -> Path:
    """A detached worktree of ``rev`` (removed at the end), for its coordinator code."""
    path = Path(tempfile.mkdtemp(prefix="pearl-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--wait-ms-b", type=float, help="arm b's --max-batch-wait-ms")
    b.add_argument("--rev-b", help="arm b's coordinator: the code of this git revision")
    p.add_argument("--wait-ms", type=float, default=None,
                   help="--max-batch-wait-ms of arm a (default: the serve default)")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--modes", default="ar,pearl")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=1, help="each phase runs this often per arm")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-tokens", type=int, default=8192)
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--json", default=None, help="write every phase's summary here")
    a = p.parse_args()
    from specdec.defaults import DEFAULT_MAX_BATCH_WAIT_MS

    wait_a = DEFAULT_MAX_BATCH_WAIT_MS if a.wait_ms is None else a.wait_ms
    concurrency = [int(c) for c in a.concurrency.split(",")]
    modes = a.modes.split(",")
    arms = {"a": Services(), "b": Services()}
    tree = checkout(a.rev_b) if a.rev_b else None
    label = {"a": "this checkout", "b": f"coordinator at {a.rev_b}" if tree else
             f"--max-batch-wait-ms {a.wait_ms_b:g}"}
    t0 = time.perf_counter()
    try:
        models = {"a": start_models(arms["a"], a, wait_a)}
        models["b"] = models["a"] if tree else start_models(arms["b"], a, a.wait_ms_b)
        address = {}
        for name, svcs in arms.items():
            d, t = models[name]
            svcs.start("coordinator", ["--draft", d, "--target", t, "--gamma", str(a.gamma)],
                       cwd=tree if name == "b" else None)
            address[name] = svcs.wait("coordinator", 120)
        prompts = load_prompts("humaneval", max(concurrency), tokenizer_only(a.target_model)
                               .tokenizer, False)
        print(f"services up in {time.perf_counter() - t0:.0f} s; a = {label['a']}, "
              f"b = {label['b']}", flush=True)
        results: list[dict] = []
        k = 0
        for c in concurrency:
            for mode in modes:
                for r in range(a.rounds):
                    order = ("a", "b") if k % 2 == 0 else ("b", "a")
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
                               "acceptance": s.get("acceptance_rate_mean"),
                               "latency_p50_s": s["latency_p50_s"], "wall_s": s["wall_s"]}
                        results.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        for svcs in arms.values():
            svcs.stop()
        if tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; a = {label['a']}, b = {label['b']}\n")
    print("| mode | concurrency | tok/s a | tok/s b | a/b | target batch a | b | "
          "queue wait s a | b |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for c in concurrency:
            def mean(arm, key):
                v = [x[key] for x in results if x["arm"] == arm and x["mode"] == mode
                     and x["concurrency"] == c and x[key] is not None]
                return statistics.mean(v) if v else float("nan")
            ta, tb = mean("a", "tokens_per_s"), mean("b", "tokens_per_s")
            print(f"| {mode} | {c} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x | "
                  f"{mean('a', 'mean_target_batch'):.2f} | {mean('b', 'mean_target_batch'):.2f}"
                  f" | {mean('a', 'queue_wait_s'):.1f} | {mean('b', 'queue_wait_s'):.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
