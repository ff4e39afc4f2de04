"""The engine: one per model in a service process, one forward pass per step over all sessions.

    servicer (protocol, per stream)
      -> session (draft_service/drafter.py, target_service/verifier.py, hidden_transfer/session.py)
           holds a PagedSequence: its token ids and its slots in the KV store
      -> PagedSequence.forward() submits a Work and waits for it (specdec/sequence.py)
      -> the engine's step loop: asks the scheduler for the next batch (specdec/scheduler.py:
         priority, token budget, chunked prefills, the coalescing wait), runs one ragged batched
         forward over it (specdec/batch_forward.py), hands each work its logits

The loop runs on the engine's thread; the scheduler's state changes only under ``cv``, the
condition variable that ``submit`` notifies. Sessions join and leave between steps: continuous
batching.

Models outside the Llama family run on transformers' own forward and DynamicCache, one work at
a time (``HFSequence``): same interface, no batching.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdec import batch_forward, static_step
from specdec.batch_forward import Feed
from specdec.defaults import (
    DEFAULT_KV_CACHE_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_WAIT_MS,
)
from specdec.kv_store import KVStore, StoreFull
from specdec.scheduler import Batch, Scheduler, Work, WorkKind
from specdec.sequence import Aborted, Forward, HFSequence, PagedSequence
from specdec.static_step import StaticStep

log = logging.getLogger("pearl.engine")


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings of `pearl serve draft|target`, from the command line to the engine."""

    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS  # KV store slots of all sessions
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # tokens fed per step
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS  # coalescing wait before a step
    compile: str = "auto"  # compiled steps: auto (on CUDA), on, off
    prefix_cache: bool = True  # reuse the K/V of prompt prefixes other sessions computed


class Engine:
    def __init__(self, model: torch.nn.Module, kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, name: str = "model",
                 compile: bool = False,
                 max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS, prefix_cache: bool = True):
        self.scheduler = Scheduler(max_batch_tokens, max_batch_wait_ms / 1e3)
        self.model = model
        self.name = name
        self.batched = batch_forward.supports(model)
        self.store: KVStore | None = (batch_forward.store_for(model, kv_cache_tokens, prefix_cache)
                                      if self.batched else None)
        # compiled steps (--compile): plain decode/verify steps as one compiled graph
        self.static = StaticStep(model, self.store) if compile and self.batched else None
        self.cv = threading.Condition()  # guards the scheduler and the sessions' ``closing``
        self.closed = False
        self.lock = threading.Lock()  # one forward at a time on the transformers path
        self.steps = 0
        self.steps_by_sessions: Counter[int] = Counter()  # steps by how many sessions they ran
        self.on_step: Callable[[int, int, int], None] | None = None  # (sessions, tokens, step_ns)
        self.waits, self.wait_ns = 0, 0  # coalescing waits and their time
        self.on_wait: Callable[[int], None] | None = None  # (ns waited)
        self.on_prefix: Callable[[int, int], None] | None = None  # (tokens hit, looked up)
        self.thread: threading.Thread | None = None
        if self.batched:
            self.thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
            self.thread.start()

    @classmethod
    def configured(cls, model: torch.nn.Module, config: EngineConfig, name: str) -> Engine:
        """The engine of a service: ``config`` from its command line."""
        device = next(model.parameters()).device
        return cls(model, config.kv_cache_tokens, config.max_batch_tokens, name,
                   compile_steps(config.compile, device), config.max_batch_wait_ms,
                   config.prefix_cache)

    @property
    def max_batch_tokens(self) -> int:
        return self.scheduler.max_batch_tokens

    @property
    def max_batch_wait_s(self) -> float:
        return self.scheduler.max_batch_wait_s

    @property
    def compiled(self) -> bool:
        return self.static is not None and self.static.broken is None

    def serving_warm_up(self) -> Callable[[], float] | None:
        """What a server runs before it says SERVING (specdec/serving.py): ``warm_up`` when the
        steps are compiled, else None, and the port opens SERVING at once."""
        return self.warm_up if self.compiled else None

    def warm_up(self) -> float:
        """Compile (and on CUDA record) the compiled step's shapes ahead of traffic. Scratch
        sessions run through the step loop itself (CUDA graphs belong to the thread that
        records them): 1 to 16 feeds, feeds that want every token's logits (verify windows) or
        only the last one's (a draft catching up). On the CPU widths 1, 2, 4 at one context
        cover every shape family; on CUDA every width bucket at contexts 64, 256 and 1024 is
        recorded (each a CUDA graph of one compile). The servers call this before they
        report SERVING (specdec/serving.py); without compiled steps there is nothing to do."""
        if self.static is None:
            return 0.0
        log.info("%s engine: building the compiled steps before serving", self.name)
        t0 = time.perf_counter()
        vocab = self.model.config.vocab_size
        shapes = [(1, 1), (4, 4), (2, 1)]  # (tokens, logits kept) per feed
        contexts = (64,)
        if self.static.cuda:
            shapes = [(n, n) for n in static_step.WIDTH_BUCKETS]  # K is padded like N
            contexts = (64, 256, 1024)
        for c in contexts:
            for n, k in shapes:
                for b in (1, 2, 4, 8, 16):
                    if b * (c + self.store.page_size) > self.store.free_tokens:
                        break  # a small store: the shapes it can hold are enough
                    seqs = [PagedSequence(self, [], WorkKind.VERIFY) for _ in range(b)]
                    try:
                        for q in seqs:
                            self.store.reserve(q.slots, c)
                            q.slots.cached = c - n  # scratch K/V: only the shapes matter
                        self._together([Work(q, WorkKind.VERIFY,
                                             [(i + j) % vocab for j in range(n)],
                                             list(range(n - k, n)), commit=False)
                                        for i, q in enumerate(seqs)])
                    finally:
                        for q in seqs:
                            q.close()
        took = time.perf_counter() - t0
        log.info("%s engine: compiled steps warmed up in %.1f s", self.name, took)
        return took

    def _together(self, works: list[Work]) -> None:
        """Run ``works`` in one step (they are queued at once) and wait for all of them."""
        self._queue(works)
        for w in works:
            w.future.result()

    # -- sessions ----------------------------------------------------------------------------

    def sequence(self, ids: list[int], kind: WorkKind = WorkKind.VERIFY
                 ) -> PagedSequence | HFSequence:
        """A new session's sequence; ``kind`` is the priority of its steps after the prefill."""
        if not self.batched:
            return HFSequence(self.model, ids, self.lock)
        if self.store.free_tokens < len(ids) + 1:
            raise StoreFull(f"KV store full: {self.store.free_tokens} of {self.store.tokens} "
                            f"token slots free, the prompt needs {len(ids) + 1} "
                            "(--kv-cache-tokens); retry later")
        return PagedSequence(self, ids, kind)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.store.bytes_per_token if self.store is not None else 0

    def submit(self, work: Work) -> Forward:
        """Queue ``work`` for the next step and wait for its result (called by session threads)."""
        self._queue([work])
        return work.future.result()

    def _queue(self, works: list[Work]) -> None:
        with self.cv:
            if self.closed:
                raise RuntimeError(f"the {self.name} engine is closed")
            if any(w.seq.closing for w in works):
                raise RuntimeError("the session is closed")
            self.scheduler.add(works)
            self.cv.notify()

    def release(self, seq: PagedSequence) -> None:
        """Give a session's pages back, now or, while a step of its runs, when that step ends:
        a stream cancelled mid-step must not hand its pages to a neighbour still written to."""
        with self.cv:
            seq.closing = True
            for w in self.scheduler.withdraw(seq):
                w.future.set_exception(RuntimeError("the session is closed"))
            if not self.scheduler.has_work(seq):
                self.store.release(seq.slots, seq.ids)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for w in self.scheduler.clear():
                w.future.set_exception(RuntimeError(f"the {self.name} engine is closed"))
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- the step loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.scheduler.pending and not self.closed:
                    self.cv.wait()
                waited = self._coalesce()
                if self.closed:
                    return
                batch = self.scheduler.schedule()
                self._drop(batch)
            if waited is not None and self.on_wait is not None:
                self.on_wait(waited)
            if batch.works:
                t0 = time.perf_counter()
                try:
                    self._step(batch.works)
                finally:
                    self._settle(time.perf_counter() - t0)

    def _coalesce(self) -> int | None:
        """Before a step (under the cv): wait for the sessions the scheduler expects back
        (specdec/scheduler.py, the coalescing wait), woken by each submit, until all of them
        are back or the time is up. Returns the time waited in ns, or None when there was
        nothing to wait for."""
        wait = self.scheduler.coalescing_wait() if not self.closed else None
        if wait is None:
            return None
        t0 = time.perf_counter_ns()
        deadline = t0 + wait.budget_ns
        while not self.closed:
            left = deadline - time.perf_counter_ns()
            if left <= 0 or self.scheduler.all_back(wait):
                break
            self.cv.wait(left / 1e9)  # submit() notifies
            self.scheduler.note_arrivals(wait.budget_ns)
        waited = time.perf_counter_ns() - t0
        self.waits += 1
        self.wait_ns += waited
        return waited

    def _drop(self, batch: Batch) -> None:
        """Fail the works the scheduler dropped (under the cv); a closed session's pages go back."""
        for w in batch.closed:
            w.future.set_exception(RuntimeError("the session is closed"))
            self.store.release(w.seq.slots, w.seq.ids)
        for w in batch.aborted:
            w.future.set_exception(Aborted())

    def _settle(self, step_s: float) -> None:
        """After a step: the scheduler notes who took part; the pages of sessions closed during
        the step go back."""
        with self.cv:
            for seq in self.scheduler.finish(step_s, time.perf_counter_ns()):
                if seq.slots.pages:
                    self.store.release(seq.slots, seq.ids)

    def _step(self, works: list[tuple[Work, int]]) -> None:
        """One forward pass over ``works`` (each with the tokens it feeds now); each finished
        work gets its result, a prefill chunk stays pending."""
        feeds: list[tuple[Work, int, Feed]] = []
        for w, n in works:
            final = w.fed + n == len(w.tokens)
            extra = len(w.pseudo.under) * w.pseudo.k if w.pseudo else 0
            try:
                self.store.reserve(w.seq.slots, w.seq.slots.cached + n + extra)
            except StoreFull as e:
                self._fail(w, e)
                continue
            keep = [k - w.fed for k in w.keep] if final else []  # into this chunk's tokens
            feeds.append((w, n, Feed(w.seq.slots, w.tokens[w.fed : w.fed + n], keep, w.rope,
                                     w.mask, w.pseudo, w.abort)))
        if not feeds:
            return
        tokens = sum(n for _, n, _ in feeds)
        started_unix_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        try:
            self._forward([f for _, _, f in feeds])
            if self.store.device.type == "cuda":
                torch.cuda.synchronize(self.store.device)
        except Exception as e:  # a bug or an out-of-memory: fail this step's works, go on
            log.exception("%s engine step failed", self.name)
            for w, _, _ in feeds:
                self._fail(w, e)
            return
        step_ns = time.perf_counter_ns() - t0
        self.steps += 1
        self.steps_by_sessions[len(feeds)] += 1
        if self.on_step is not None:
            self.on_step(len(feeds), tokens, step_ns)
        for w, n, f in feeds:
            w.forward_ns += step_ns
            if f.aborted:
                self._fail(w, Aborted())
                continue
            if w.commit:
                w.seq.slots.cached += n
            w.fed += n
            if w.fed < len(w.tokens):
                continue  # a prefill chunk: the work stays pending
            waited = time.perf_counter_ns() - w.submitted_ns - w.forward_ns
            w.future.set_result(Forward(
                f.out, w.seq.start_of(w), len(w.tokens), w.forward_ns, started_unix_ns,
                batch_rows=len(feeds), batch_tokens=tokens, queue_ns=max(0, waited)))

    def _forward(self, feeds: list[Feed]) -> None:
        """The compiled step when every feed fits it, else the eager one. A compiled step that
        fails (a backend that cannot build it) is logged once and never tried again."""
        if self.static is not None and self.static.fits(feeds):
            try:
                return self.static.forward(feeds)
            except Exception as e:
                log.exception("%s engine: the compiled step failed; eager steps from now on",
                              self.name)
                self.static.broken = e
                for f in feeds:
                    f.out, f.aborted = None, False
        batch_forward.forward(self.model, self.store, feeds)

    def _fail(self, w: Work, e: Exception) -> None:
        with self.cv:
            self.scheduler.discard(w)
        if not w.future.done():
            w.future.set_exception(e)


def describe_engine(engine: Engine) -> str:
    """One line for the service log."""
    if not engine.batched:
        return "engine: transformers' forward, one session at a time (not a Llama-family model)"
    s = engine.store
    return (f"engine: batched{', compiled' if engine.compiled else ''}, KV store {s.tokens} "
            f"tokens x {s.bytes_per_token} B ({s.tokens * s.bytes_per_token / 2**20:.0f} MiB), "
            f"{engine.max_batch_tokens} tokens per step, "
            + (f"waits up to {engine.max_batch_wait_s * 1e3:g} ms for the last step's sessions"
               if engine.max_batch_wait_s else "no coalescing wait")
            + (", prefix cache on" if s.prefix_cache else ", prefix cache off"))


COMPILE_CHOICES = ("auto", "on", "off")


def compile_steps(choice: str, device: torch.device) -> bool:
    """--compile: ``auto`` compiles on CUDA (launch-bound eager steps) and not on the CPU (there
    the steps are memory-bound and compiling costs minutes for a few percent: the README's
    measurement); ``on`` and ``off`` force it."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda")
