"""Eager vs compiled engine steps on this machine: decode-step time of one model at batch 1..8,
the two engines side by side in one process, interleaved (issue 16's CPU comparison).

    .venv/bin/python scripts/compile_cpu.py --model qwen2.5-coder-1.5b-instruct --threads 1
"""

import argparse
import statistics
import threading
import time

import torch

from specdec.engine import Engine
from specdec.models import load_model


def step_ms(engine: Engine, batch: int, steps: int) -> float:
    """Median time of a decode step with ``batch`` sessions of 64-token prompts."""
    seqs = [engine.sequence([(17 * i + j) % 1000 + 10 for j in range(64)]) for i in range(batch)]
    run_all(seqs, lambda q: q.forward())
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        run_all(seqs, lambda q: (q.extend([100 + k]), q.forward()))
        times.append((time.perf_counter() - t0) * 1e3)
    for q in seqs:
        q.close()
    return statistics.median(times)


def run_all(seqs, fn) -> None:
    threads = [threading.Thread(target=fn, args=(q,)) for q in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    loaded = load_model(a.model, "cpu", a.dtype, a.threads)
    t0 = time.perf_counter()
    compiled = Engine(loaded.model, 8192, name="compiled", compile=True)
    warm = time.perf_counter() - t0
    eager = Engine(loaded.model, 8192, name="eager")
    batches = [int(b) for b in a.batches.split(",")]
    rows = {b: {"eager": [], "compiled": []} for b in batches}
    for _ in range(a.rounds):  # interleaved: both engines see the same machine state
        for b in batches:
            for name, e in (("eager", eager), ("compiled", compiled)):
                rows[b][name].append(step_ms(e, b, a.steps))
    print(f"{a.model}, {a.dtype}, {a.threads} thread(s), torch {torch.__version__}; "
          f"compile + warm-up {warm:.0f} s")
    print("| sessions | eager step ms | compiled step ms | compiled / eager |")
    print("|---|---|---|---|")
    for b in batches:
        e, c = statistics.median(rows[b]["eager"]), statistics.median(rows[b]["compiled"])
        print(f"| {b} | {e:.0f} | {c:.0f} | {c / e:.2f}x |")
    compiled.close()
    eager.close()


if __name__ == "__main__":
    main()
