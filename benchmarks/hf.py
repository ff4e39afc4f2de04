"""transformers' own batching of the target in this process, as the load and serve benches'
contenders: left-padded batched ``generate`` (``hf-padded-*``: the c clients' requests padded into
one batch per round, the round ends when its longest row does) and continuous batching
(``hf-cb-*``: the manager behind ``generate_batch``, sdpa attention on a paged cache; the c clients
submit and wait on their own requests, which join and leave the running batch). ``-1t``: one
thread on the target service's CPU (idle meanwhile); ``-all``: every core.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from benchmarks.closed_loop import plan, record
from benchmarks.hardware import ALL_CPUS, pin

CB_PAGE = 64  # tokens per page of transformers' paged cache (hf-cb)


class HFTarget:
    """The target in this process: left-padded batched ``generate`` and continuous batching."""

    def __init__(self, loaded):
        from benchmarks.local import warm_pool

        self.loaded, self.model = loaded, loaded.model
        gc = self.model.generation_config
        eos = gc.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else min(self.eos, default=0)
        warm_pool(self.model)

    @staticmethod
    def threads(contender: str) -> list[int]:
        """'-1t': one thread on the target service's CPU (idle meanwhile); '-all': every core."""
        return ALL_CPUS[-1:] if contender.endswith("-1t") else ALL_CPUS

    @staticmethod
    @contextmanager
    def pinned(contender: str):
        """This thread (and the threads it starts) on the contender's CPUs, torch on as many
        threads; all CPUs again afterwards."""
        import torch

        cpus = HFTarget.threads(contender)
        pin(cpus)
        torch.set_num_threads(len(cpus))
        try:
            yield
        finally:
            pin(ALL_CPUS)
            torch.set_num_threads(len(ALL_CPUS))

    def cut(self, row: list[int]) -> list[int]:
        """New tokens up to and including the first end-of-sequence token."""
        for i, t in enumerate(row):
            if t in self.eos:
                return row[: i + 1]
        return row

    def padded_phase(self, contender: str, c: int, prompts: list[dict], m: int, per_client: int,
                     duration: float | None) -> list[dict]:
        per = per_client if duration is None else 10**9  # with a duration: rounds until then
        out = []
        with self.pinned(contender):
            plans = [plan(c, i, len(prompts), per, None) for i in range(c)]
            deadline = None if duration is None else time.perf_counter() + duration
            while deadline is None or time.perf_counter() < deadline:
                batch = [(i, prompts[k]) for i, pl in enumerate(plans) for k in
                         (next(pl, None),) if k is not None]
                if not batch:
                    break
                out += self.padded_round(contender, c, batch, m)
        return out

    def padded_round(self, contender: str, c: int, batch: list[tuple[int, dict]],
                     m: int) -> list[dict]:
        """One ``generate`` of the batch's prompts, left-padded to the longest."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from benchmarks.local import sync

        class FirstStep(LogitsProcessor):  # called once per step, the first right after prefill
            first: float | None = None

            def __call__(self, input_ids, scores):
                if self.first is None:
                    self.first = time.perf_counter()
                return scores

        width = max(len(p["ids"]) for _, p in batch)
        ids = torch.tensor([[self.pad] * (width - len(p["ids"])) + p["ids"]
                            for _, p in batch], device=self.loaded.device)
        mask = torch.tensor([[0] * (width - len(p["ids"])) + [1] * len(p["ids"])
                             for _, p in batch], device=self.loaded.device)
        step = FirstStep()
        start = time.perf_counter()
        with torch.inference_mode():
            gen = self.model.generate(ids, attention_mask=mask, max_new_tokens=m,
                                      do_sample=False, pad_token_id=self.pad,
                                      logits_processor=LogitsProcessorList([step]))
        sync(self.model)
        end = time.perf_counter()
        return [record(contender, c, i, p, self.cut(row), start, step.first, end,
                       batch_size=len(batch))
                for row, (i, p) in zip(gen[:, width:].tolist(), batch)]

    def cb_configs(self, c: int, prompts: list[dict], m: int):
        """The paged cache sized for c requests (sized by hand: left to itself on a CPU it takes
        60 % of the RAM), chunked prefill under a token budget; greedy generation."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        longest = max(len(p["ids"]) for p in prompts) + m
        cfg = ContinuousBatchingConfig(
            page_size=CB_PAGE, num_blocks=c * (math.ceil(longest / CB_PAGE) + 1) + 1,
            max_batch_tokens=max(256, longest), max_requests_per_batch=max(c, 1),
            allow_block_sharing=False)
        gen = GenerationConfig(do_sample=False, max_new_tokens=m, pad_token_id=self.pad,
                               eos_token_id=sorted(self.eos) or -1)
        return cfg, gen

    def cb_phase(self, contender: str, c: int, prompts: list[dict], m: int, per_client: int,
                 duration: float | None) -> list[dict]:
        """Continuous batching: c clients submit to one manager and each waits on its own
        requests (:meth:`cb_configs`)."""
        cfg, gen = self.cb_configs(c, prompts, m)
        # pinned: the manager's generation thread inherits this thread's affinity
        with self.pinned(contender), self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cfg, warmup=False) as mgr:
            results = CBResults(mgr)
            barrier = threading.Barrier(c)

            def run(i: int) -> list[dict]:
                out = []
                barrier.wait()
                deadline = None if duration is None else time.perf_counter() + duration
                for j, k in enumerate(plan(c, i, len(prompts), per_client, deadline)):
                    p, rid = prompts[k], f"{contender}-{c}-{i}-{j}"
                    start = time.perf_counter()
                    mgr.add_request(p["ids"], request_id=rid, max_new_tokens=m,
                                    record_timestamps=True)
                    res, end = results.wait(rid, contender)
                    first = res.timestamps[0] if res.timestamps else None
                    out.append(record(contender, c, i, p, self.cut(res.generated_tokens),
                                      start, first, end))
                return out

            try:
                with ThreadPoolExecutor(c) as ex:
                    return [r for rs in ex.map(run, range(c)) for r in rs]
            finally:
                results.close()


class CBResults:
    """The finished requests of a continuous-batching manager by request id, with the time each
    was seen: one reader of the manager's shared output queue, in its own thread."""

    def __init__(self, mgr):
        self.mgr = mgr
        self.done: dict[str, tuple[object, float]] = {}
        self.ready = threading.Condition()
        self.stop = threading.Event()
        self.router = threading.Thread(target=self.route, daemon=True)
        self.router.start()

    def route(self) -> None:
        while not self.stop.is_set():
            r = self.mgr.get_result(timeout=0.05)
            if r is not None and r.is_finished():
                with self.ready:
                    self.done[r.request_id] = (r, time.perf_counter())
                    self.ready.notify_all()

    def wait(self, rid: str, contender: str) -> tuple[object, float]:
        """The finished request ``rid`` and when it was seen; raises if it failed or the
        generation thread stopped first."""
        with self.ready:
            self.ready.wait_for(lambda: rid in self.done or not self.mgr.is_running())
        if rid not in self.done:
            raise RuntimeError(f"{contender}: the generation thread stopped")
        res, end = self.done.pop(rid)
        if res.error:
            raise RuntimeError(f"{contender}: {res.error}")
        return res, end

    def close(self) -> None:
        self.stop.set()
        self.router.join(timeout=5)
