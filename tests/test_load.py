"""A bounded loopback load test (docs/design.md section 11): 16 concurrent clients, 480 requests of
mixed modes on tiny models in this process; every output equals the greedy reference, no errors,
every session is freed, and the resident memory after warm-up stays flat. Prints requests/s,
p50/p99 latency and the RSS growth (run with -s to see them)."""

import gc
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client

CONCURRENCY = 16
REQUESTS = 480
WARMUP = 64
N = 12
MODES = ("ar", "sd", "pearl")
PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(4 + i % 5)] for i in range(8)]
RSS_GROWTH_LIMIT_MB = 40


def test_load(tiny_draft, tiny_target):
    refs = [greedy_reference(tiny_target, p, N) for p in PROMPTS]
    c = Cluster(tiny_draft, tiny_target)
    clients = [Client(c.address, timeout_s=60) for _ in range(CONCURRENCY)]
    proc = psutil.Process()

    def one(i: int):
        k = i % len(PROMPTS)
        t0 = time.perf_counter()
        r = clients[i % CONCURRENCY].complete(PROMPTS[k], mode=MODES[i % len(MODES)],
                                              max_new_tokens=N, ignore_eos=True)
        return i, k, r, time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            warm = list(pool.map(one, range(WARMUP)))
            gc.collect()
            rss0 = proc.memory_info().rss
            t0 = time.perf_counter()
            results = list(pool.map(one, range(WARMUP, REQUESTS)))
            elapsed = time.perf_counter() - t0
            gc.collect()
            rss1 = proc.memory_info().rss
        for i, k, r, _ in warm + results:
            assert r.token_ids == refs[k], f"request {i} ({MODES[i % 3]}) differs"
            assert r.stats["new_tokens"] == N and not r.stats["fell_back"]
        lat = sorted(dt for *_, dt in results)
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        growth_mb = (rss1 - rss0) / 2**20
        print(f"\nload: {len(results)} requests after {WARMUP} warm-up, {CONCURRENCY} concurrent, "
              f"modes {'/'.join(MODES)}, {N} tokens each: {len(results) / elapsed:.1f} "
              f"requests/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; RSS "
              f"{rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB ({growth_mb:+.1f} MiB)")
        deadline = time.monotonic() + 3
        while (c.draft.live or c.target.live) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.draft.live == 0 and c.target.live == 0
        assert growth_mb < RSS_GROWTH_LIMIT_MB
    finally:
        for cl in clients:
            cl.close()
        c.close()


if __name__ == "__main__":
    pytest.main([__file__, "-s", "-q"])
