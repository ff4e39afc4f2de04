"""A/B of two service set-ups side by side, on the default pair (or any pair) on loopback.

Arm `a` is this checkout as it is. Arm `b` differs in one of three ways:

- `--wait-ms-b X`: its draft and target run with `--max-batch-wait-ms X` (the engine's coalescing
  wait, docs/design.md section 12); each arm then has its own draft, target and coordinator.
- `--rev-b REV`: its coordinator runs the code of git revision REV (a schedule change, section 4);
  both coordinators then share one draft and one target, so only the schedule differs.
- `--rev-b REV --whole`: its draft, target and coordinator all run the code of REV, each its own
  process (a change anywhere: this checkout against an earlier revision, the same flags).

The code of REV is a detached git worktree (removed at the end); arm b's processes run in it, with
it alone on PYTHONPATH, and the packages they import are checked to come from it before they
start. Draft on the first CPU, target on the last, one thread each (each arm's own on the same
two). Every phase (mode x concurrency) runs on both arms one after the other, the order swapped
each time, so the machine's noise falls on both alike and only one arm is busy at a time. Prints
tok/s, mean target batch and queue wait per request, and the a/b throughput ratio.

    .venv/bin/python -m benchmarks.ab --rev-b HEAD --concurrency 1,4,8 --modes pearl --rounds 2
    .venv/bin/python -m benchmarks.ab --rev-b HEAD~1 --whole --concurrency 1,8 --modes ar,pearl
    .venv/bin/python -m benchmarks.ab --wait-ms-b 0 --concurrency 1,2,4,8 --modes ar,pearl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import hardware
from benchmarks.closed_loop import service_phase
from benchmarks.load_analysis import summarize
from benchmarks.services import start_coordinator, start_pair
from pearl.procs import Services
from specdec.defaults import DEFAULT_MODELS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pearl", "specdec", "coordinator", "draft_service", "target_service", "protos")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab",
                                description=__doc__.splitlines()[0])
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--wait-ms-b", type=float, help="arm b's --max-batch-wait-ms")
    b.add_argument("--rev-b", help="arm b's coordinator: the code of this git revision")
    p.add_argument("--whole", action="store_true",
                   help="with --rev-b: arm b's draft and target run that revision's code too")
    p.add_argument("--wait-ms", type=float, default=None,
                   help="--max-batch-wait-ms of arm a (and of arm b but with --wait-ms-b; "
                        "default: the serve default)")
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
    a = p.parse_args(argv)
    if a.whole and not a.rev_b:
        p.error("--whole needs --rev-b")
    if a.wait_ms is None:
        from specdec.defaults import DEFAULT_MAX_BATCH_WAIT_MS

        a.wait_ms = DEFAULT_MAX_BATCH_WAIT_MS
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.modes = a.modes.split(",")
    return a


# -- the code arm b runs --------------------------------------------------------------------------


def checkout(rev: str) -> Path:
    """A detached worktree of ``rev`` (removed at the end), for arm b's code."""
    path = Path(tempfile.mkdtemp(prefix="pearl-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)
    return path


def code_of(tree: Path) -> dict:
    """`Services.start`'s ``cwd`` and ``env`` that make a process run the code in ``tree``: its
    folder first on sys.path (``python -m`` puts the working directory there, ahead of this
    checkout's editable install) and alone on PYTHONPATH."""
    return {"cwd": tree, "env": {"PYTHONPATH": str(tree)}}


def check_code(tree: Path) -> dict[str, str]:
    """Where a process started with :func:`code_of` finds each of the project's packages;
    RuntimeError where one is not in ``tree``."""
    probe = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n)"
             f".origin for n in {PACKAGES!r}}}))")
    code = code_of(tree)
    out = subprocess.run([sys.executable, "-c", probe], cwd=code["cwd"], capture_output=True,
                         text=True, check=True, env={**os.environ, **code["env"]})
    found = json.loads(out.stdout)
    elsewhere = {n: o for n, o in found.items() if not Path(o).resolve().is_relative_to(
        tree.resolve())}
    if elsewhere:
        raise RuntimeError(f"arm b would not run the code in {tree}: {elsewhere}")
    return found


# -- the arms -------------------------------------------------------------------------------------


def label(a) -> str:
    if a.rev_b:
        return f"{'draft, target and coordinator' if a.whole else 'coordinator'} at {a.rev_b}"
    return f"--max-batch-wait-ms {a.wait_ms_b:g}"


def start_arms(a, arms: dict[str, Services], tree: Path | None) -> dict[str, str]:
    """Both arms' services; each arm's coordinator address. Arm b's processes run the code in
    ``tree`` where there is one: its coordinator, and with --whole its draft and target too."""
    code = {"a": {}, "b": code_of(tree) if tree else {}}
    own = {"a": True, "b": not a.rev_b or a.whole}  # whether the arm has its own draft and target
    wait = {"a": a.wait_ms, "b": a.wait_ms if a.wait_ms_b is None else a.wait_ms_b}
    for arm in ("a", "b"):
        if own[arm]:
            serve = ["--kv-cache-tokens", str(a.kv_cache_tokens),
                     "--max-batch-wait-ms", str(wait[arm])]
            start_pair(arms[arm], a.draft_model, a.target_model, "cpu", a.dtype, serve,
                       **code[arm])
    models = {arm: (arms[arm].wait("draft"), arms[arm].wait("target")) for arm in arms
              if own[arm]}
    models.setdefault("b", models["a"])
    return {arm: start_coordinator(arms[arm], *models[arm], ["--gamma", str(a.gamma)],
                                   **code[arm]) for arm in ("a", "b")}


def serving(arms: dict[str, Services], arm: str) -> dict:
    """The processes that serve ``arm``'s requests, by role: its own, and the draft and target
    of arm a where arm b shares them (--rev-b without --whole)."""
    return {**arms["a"].all, **arms[arm].all}


def cpu_s(procs: dict) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, by role."""
    return {role: hardware.cpu_s(svc.proc.pid) for role, svc in procs.items()}


def phases(a, address: dict[str, str], prompts: list[dict], arms: dict[str, Services]
           ) -> list[dict]:
    """Every mode at every concurrency, ``--rounds`` times, on both arms one after the other,
    the order swapped each time; one summary per arm and phase, with the CPU time each process
    serving the arm spent per new token (steadier than tok/s on a noisy machine)."""
    results: list[dict] = []
    k = 0
    for c in a.concurrency:
        for mode in a.modes:
            for r in range(a.rounds):
                for arm in ("a", "b") if k % 2 == 0 else ("b", "a"):
                    before = cpu_s(serving(arms, arm))
                    recs = service_phase(address[arm], mode, c, prompts, a.max_new_tokens,
                                         a.gamma, 1, None)
                    after = cpu_s(serving(arms, arm))
                    results.append(summary(arm, mode, c, r, recs))
                    tokens = max(1, sum(x["new_tokens"] for x in recs))
                    results[-1]["cpu_ms_per_token"] = {
                        role: round(1000 * (after[role] - before[role]) / tokens, 2)
                        for role in after}
                    print(json.dumps(results[-1]), flush=True)
                k += 1
    return results


def summary(arm: str, mode: str, c: int, r: int, recs: list[dict]) -> dict:
    s = summarize(recs)
    batch = [x["mean_target_batch"] for x in recs if x["mean_target_batch"]]
    return {"arm": arm, "mode": mode, "concurrency": c, "round": r,
            "tokens_per_s": s["tokens_per_s"],
            "mean_target_batch": statistics.mean(batch) if batch else None,
            "queue_wait_s": statistics.mean(x["queue_wait_s"] or 0 for x in recs),
            "acceptance": s.get("acceptance_rate_mean"),
            "latency_p50_s": s["latency_p50_s"], "wall_s": s["wall_s"]}


def cpu_table(results: list[dict]) -> str:
    """Mean CPU ms per new token of each process serving an arm, by mode and concurrency."""
    rows = sorted({(x["mode"], x["concurrency"]) for x in results})
    roles = sorted({role for x in results for role in x["cpu_ms_per_token"]})
    lines = ["| mode | concurrency | " + " | ".join(f"{r} ms/token a | b" for r in roles) + " |",
             "|---|---|" + "---|---|" * len(roles)]
    for mode, c in rows:
        cells = []
        for role in roles:
            for arm in ("a", "b"):
                v = [x["cpu_ms_per_token"][role] for x in results if x["arm"] == arm
                     and x["mode"] == mode and x["concurrency"] == c
                     and role in x["cpu_ms_per_token"]]
                cells.append(f"{statistics.mean(v):.1f}" if v else "-")
        lines.append(f"| {mode} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[dict], modes: list[str], concurrency: list[int]) -> str:
    lines = ["| mode | concurrency | tok/s a | tok/s b | a/b | target batch a | b | "
             "queue wait s a | b |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        for c in concurrency:
            def mean(arm, key):
                v = [x[key] for x in results if x["arm"] == arm and x["mode"] == mode
                     and x["concurrency"] == c and x[key] is not None]
                return statistics.mean(v) if v else float("nan")
            ta, tb = mean("a", "tokens_per_s"), mean("b", "tokens_per_s")
            lines.append(f"| {mode} | {c} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x | "
                         f"{mean('a', 'mean_target_batch'):.2f} | "
                         f"{mean('b', 'mean_target_batch'):.2f} | "
                         f"{mean('a', 'queue_wait_s'):.1f} | {mean('b', 'queue_wait_s'):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.local import tokenizer_only
    from benchmarks.prompts import load_prompts

    a = parse(argv)
    labels = {"a": "this checkout", "b": label(a)}
    arms = {"a": Services(), "b": Services()}
    tree = checkout(a.rev_b) if a.rev_b else None
    t0 = time.perf_counter()
    try:
        if tree:
            for name, origin in check_code(tree).items():
                print(f"arm b imports {name} from {origin}", flush=True)
        address = start_arms(a, arms, tree)
        prompts = load_prompts("humaneval", max(a.concurrency),
                               tokenizer_only(a.target_model).tokenizer, False)
        print(f"services up in {time.perf_counter() - t0:.0f} s; a = {labels['a']}, "
              f"b = {labels['b']}", flush=True)
        results = phases(a, address, prompts, arms)
    finally:
        for svcs in arms.values():
            svcs.stop()
        if tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
            shutil.rmtree(tree.parent, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; a = {labels['a']}, b = {labels['b']}\n")
    print(table(results, a.modes, a.concurrency))
    print("\nCPU per new token (user + system):\n")
    print(cpu_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
