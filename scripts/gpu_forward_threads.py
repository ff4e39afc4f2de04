"""The forward time of a 7B-shaped model on a GPU by thread count and thread (docs/benchmarks-gpu.md).

Run: PEARL_RANDOM_TOKENIZER=<a Qwen2.5 tokenizer folder> python scripts/gpu_forward_threads.py
"""
import asyncio, time
from concurrent.futures import ThreadPoolExecutor
import torch
from specdec.sequence import HFSequence
from specdec.models import load_model

m = load_model("random:qwen2.5-7b", "cuda", "bfloat16")

def bench(n=40):
    seq = HFSequence(m.model, list(range(100, 200)))
    seq.forward()
    ts = []
    for _ in range(n):
        seq.extend([5]); t = time.perf_counter(); seq.forward(); ts.append(time.perf_counter() - t)
    return round(sorted(ts)[n // 2] * 1e3, 1)

ex = ThreadPoolExecutor(1)
print("main thread, default torch threads", bench(), "ms", flush=True)
print("worker thread", ex.submit(bench).result(), "ms", flush=True)
torch.set_num_threads(1)
print("main thread, 1 torch thread", bench(), "ms", flush=True)
print("worker thread, 1 torch thread", ex.submit(bench).result(), "ms", flush=True)

async def main():
    from specdec.serving import Server
    s = Server(["pearl.v1.TargetService"])
    await s.start(0, "127.0.0.1")
    r = await asyncio.get_running_loop().run_in_executor(ex, bench)
    print("worker thread beside a grpc aio server", r, "ms", flush=True)
    await s.stop(0)
asyncio.run(main())
