"""Eager vs compiled engine steps: the decode-step time of each model at 1..N sessions, the two
engines side by side in one process, interleaved (the compiled engine's step-time goals).

    .venv/bin/python -m benchmarks.step_times --device cpu --model qwen2.5-coder-0.5b-instruct \
        --batches 1,8
    python3 -m benchmarks.step_times --device cuda --model random:qwen2.5-0.5b,random:qwen2.5-7b \
        --batches 1,4,16

A step is one engine step of ``sessions`` decode rows (64-token prompts, one new token each);
its time is the engine's own (``Forward.forward_ns`` of the steps that held every session), the
median over ``--steps`` steps and ``--rounds`` interleaved rounds. On CUDA each model also gets
the memory-bandwidth limit of its decode step: the bytes of its weights (each tensor once: a tied
embedding is read whole as the LM head) over ``--bandwidth-gbs`` (default 4800 GB/s, the H200's
datasheet figure; a device-to-device copy on this workplace's H200 moved about 4300), KV reads
not counted (contexts of ~64 tokens); and the compiled step as a fraction of that limit
(limit / step: 1.0 is the limit). With two models or more the first is taken for the draft and
the last for the target, and the table ends with the draft step / target step ratio.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from specdec.defaults import DEFAULT_KV_CACHE_TOKENS, DEFAULT_MAX_BATCH_TOKENS
from specdec.engine import Engine
from specdec.models import load_model

PROMPT = 64  # tokens per session before the timed steps


class Sessions:
    """``batch`` sessions, each driven by its own thread (as the services' sessions are): every
    ``step()`` makes each extend its sequence by one token and forward it, all at once, so that
    the engine batches them into one step."""

    def __init__(self, engine: Engine, batch: int, vocab: int):
        self.seqs = [engine.sequence([(17 * i + j) % (vocab - 10) + 10 for j in range(PROMPT)])
                     for i in range(batch)]
        self.go, self.done = threading.Barrier(batch + 1), threading.Barrier(batch + 1)
        self.token: int | None = None  # None: the prefill; -1: stop
        self.results: list = [None] * batch
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(batch)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        q = self.seqs[i]
        while True:
            self.go.wait()
            if self.token == -1:
                return
            if self.token is not None:
                q.extend([self.token])
            self.results[i] = q.forward()
            self.done.wait()

    def step(self, token: int | None) -> tuple[float, list]:
        """(wall seconds of the round, each session's Forward)."""
        self.token = token
        t0 = time.perf_counter()
        self.go.wait()
        self.done.wait()
        return time.perf_counter() - t0, list(self.results)

    def close(self) -> None:
        self.token = -1
        self.go.wait()
        for t in self.threads:
            t.join()
        for q in self.seqs:
            q.close()


def step_ms(engine: Engine, batch: int, steps: int, vocab: int) -> tuple[float, float]:
    """(median engine step ms over the steps that held all ``batch`` sessions, median round ms
    as the sessions saw it)."""
    s = Sessions(engine, batch, vocab)
    try:
        s.step(None)  # the prefills
        s.step(100)  # the first decode step of these shapes, not timed
        engine_ms, round_ms = [], []
        for k in range(steps):
            wall, fwd = s.step(100 + k)
            round_ms.append(wall * 1e3)
            engine_ms += [f.forward_ns / 1e6 for f in fwd[:1] if f.batch_rows == batch]
    finally:
        s.close()
    med = statistics.median(round_ms)
    return (statistics.median(engine_ms) if engine_ms else med), med


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from the weights: every parameter tensor once (parameters()
    already yields a tied embedding once: it is read whole as the LM head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(name: str, a, batches: list[int]) -> dict:
    loaded = load_model(name, a.device, a.dtype, a.threads)
    vocab = loaded.model.config.vocab_size
    t0 = time.perf_counter()
    compiled = Engine(loaded.model, DEFAULT_KV_CACHE_TOKENS, DEFAULT_MAX_BATCH_TOKENS,
                      name=f"{name}-compiled", compile=True)
    compiled.warm_up()
    warm = time.perf_counter() - t0
    eager = Engine(loaded.model, DEFAULT_KV_CACHE_TOKENS, DEFAULT_MAX_BATCH_TOKENS,
                   name=f"{name}-eager", compile=False)
    rows = {b: {"eager": [], "compiled": []} for b in batches}
    try:
        for _ in range(a.rounds):  # interleaved: both engines see the same machine state
            for b in batches:
                for kind, e in (("eager", eager), ("compiled", compiled)):
                    rows[b][kind].append(step_ms(e, b, a.steps, vocab))
    finally:
        compiled.close()
        eager.close()
    out = {"name": name, "warm_s": warm, "bytes": weight_bytes(loaded.model),
           "is_compiled": getattr(compiled, "compiled", None), "rows": {}}
    for b in batches:
        out["rows"][b] = {k: (statistics.median(x[0] for x in v),
                              statistics.median(x[1] for x in v)) for k, v in rows[b].items()}
    del loaded, compiled, eager
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return out


def table(results: list[dict], a) -> str:
    cuda = a.device == "cuda"
    head = ["model", "sessions", "eager step ms", "compiled step ms", "compiled / eager",
            "eager round ms", "compiled round ms"]
    if cuda:
        head += [f"bandwidth limit ms ({a.bandwidth_gbs:g} GB/s)", "limit / compiled step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        limit_ms = r["bytes"] / (a.bandwidth_gbs * 1e9) * 1e3
        for b, v in r["rows"].items():
            (e, er), (c, cr) = v["eager"], v["compiled"]
            cells = [r["name"], str(b), f"{e:.2f}", f"{c:.2f}", f"{c / e:.2f}x", f"{er:.2f}",
                     f"{cr:.2f}"]
            if cuda:
                cells += [f"{limit_ms:.2f}", f"{limit_ms / c:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """Draft (first model) step / target (last model) step, compiled, at each batch."""
    draft, target = results[0], results[-1]
    step = lambda r, b: r["rows"][b]["compiled"][0]  # noqa: E731
    parts = [f"{b} sessions {step(draft, b) / step(target, b):.2f}"
             for b in draft["rows"] if b in target["rows"]]
    return (f"compiled draft step / compiled target step ({draft['name']} / {target['name']}; "
            f"goal <= 0.20): " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_times",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                    help="a model name (registry, folder, random:<shape>) or a comma list: the "
                         "first is the draft, the last the target")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per GPU service)")
    ap.add_argument("--batches", default="1,4,8", help="sessions per step, comma list")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per engine")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0,
                    help="memory bandwidth for the limit (CUDA): 4800 = H200 datasheet; "
                         "3350 = H100 SXM")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    results = []
    for name in [m.strip() for m in a.model.split(",") if m.strip()]:
        t0 = time.perf_counter()
        results.append(measure(name, a, batches))
        r = results[-1]
        print(f"{name}: {r['bytes'] / 1e9:.2f} GB of weights; compile + warm-up "
              f"{r['warm_s']:.1f} s; compiled engine reports compiled={r['is_compiled']}; "
              f"{time.perf_counter() - t0:.0f} s\n{table([r], a)}\n", flush=True)
    where = torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu, {a.threads} thread(s)"
    print(f"\n{where}, {a.dtype}, torch {torch.__version__}; median of {a.steps} steps x "
          f"{a.rounds} interleaved rounds; step = the engine's own time of a step holding every "
          "session, round = the sessions' wall time\n")
    print(table(results, a))
    if a.device == "cuda":
        print(f"\nbandwidth limit = weight bytes / {a.bandwidth_gbs:g} GB/s (KV reads not "
              "counted); limit / compiled step >= 0.50 is the goal for the target")
    if len(results) > 1:
        print("\n" + ratios(results))


if __name__ == "__main__":
    main()
