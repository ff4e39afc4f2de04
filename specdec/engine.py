"""The engine: one per model in a service process, one forward pass per step over all sessions.

    servicer (protocol, per stream)
      -> session (draft_service/drafter.py, target_service/verifier.py, hidden_transfer/session.py)
           holds a Sequence: its token ids and its slots in the KV store
      -> Sequence.forward() submits a Work and waits for it
      -> Engine step loop: takes the pending works by priority under a token budget, runs one
         ragged batched forward over them (specdec/batch_forward.py), hands each its logits

Priority inside a step: verify windows (every session's critical path), then draft steps, then
prefills. A prefill longer than the step's token budget (``max_batch_tokens``) is fed in chunks
over several steps so a long prompt never stalls the others; a prefill that found no room for
``STARVE_STEPS`` steps goes first. Sessions join and leave between steps: continuous batching.

Models outside the Llama family run on transformers' own forward and DynamicCache, one work at
a time (``HFSequence``): same interface, no batching.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from specdec import batch_forward, static_step
from specdec.batch_forward import Pseudo, Row
from specdec.kv import Aborted, CachedSequence, Forward, TokenIds
from specdec.kv_store import KVStore, BlockTable, StoreFull
from specdec.static_step import StaticStep

log = logging.getLogger("pearl.engine")

from specdec.defaults import (  # noqa: E402
    DEFAULT_KV_CACHE_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_WAIT_MS,
)
PRIORITY = {"verify": 0, "draft": 1, "prefill": 2}
STARVE_STEPS = 4  # a prefill left out this many steps in a row goes first
PREFIX_WAIT_S = 30.0  # longest wait for another session's prefill of the same prefix
# The coalescing wait before a step (Engine._coalesce): at most this fraction of the recent step
# time (an EMA with weight STEP_EMA), and only for sessions that came back within the wait on at
# least RETURN_MIN of their recent returns (an EMA with weight RETURN_EMA).
WAIT_FRACTION = 0.25
STEP_EMA = 0.2
RETURN_EMA = 0.25
RETURN_MIN = 0.2


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings of `pearl serve draft|target`, from the command line to the engine."""

    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS  # KV store slots of all sessions
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # tokens fed per step
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS  # coalescing wait before a step
    compile: str = "auto"  # compiled steps: auto (on CUDA), on, off
    prefix_cache: bool = True  # reuse the K/V of prompt prefixes other sessions computed


@dataclass
class Work:
    """One session's forward, waiting for (or in) a step."""

    seq: Sequence
    kind: str  # "verify", "draft" or "prefill"
    tokens: list[int]
    keep: list[int]  # token indices whose logits are wanted (into tokens, then pseudo tokens)
    rope: list[int] | None = None
    mask: torch.Tensor | None = None
    pseudo: Pseudo | None = None
    commit: bool = True  # advance the session's cached length by the tokens fed
    abort: threading.Event | None = None
    future: Future = field(default_factory=Future)
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    fed: int = 0  # tokens already fed (chunked prefill)
    forward_ns: int = 0  # time of the steps this work took part in
    waited: int = 0  # steps it was left out of


@dataclass
class Return:
    """How a session comes back to the engine after its work is done (the coalescing wait)."""

    done_ns: int = 0  # when its last work ended
    out: bool = False  # its next work has not arrived yet
    quick: float = 1.0  # EMA of "its next work came within the wait"


class Engine:
    def __init__(self, model: torch.nn.Module, kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, name: str = "model",
                 compile: bool = False,
                 max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS, prefix_cache: bool = True):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.name = name
        self.batched = batch_forward.supports(model)
        self.store: KVStore | None = (batch_forward.store_for(model, kv_cache_tokens, prefix_cache)
                                      if self.batched else None)
        self.max_batch_tokens = max_batch_tokens
        # compiled steps (--compile): plain decode/verify steps as one compiled graph
        self.static = StaticStep(model, self.store) if compile and self.batched else None
        self.pending: list[Work] = []
        self.cv = threading.Condition()
        self.closed = False
        self.lock = threading.Lock()  # one forward at a time on the transformers path
        self.steps = 0
        self.rows_seen: Counter[int] = Counter()  # steps by how many sessions they batched
        self.running: list[Work] = []  # the works of the step in progress
        self.on_step: Callable[[int, int, int], None] | None = None  # (rows, tokens, step_ns)
        # the coalescing wait (_coalesce): its cap, the recent step time, the sessions of the
        # last step, how each session comes back, and the time spent waiting (on_wait: ns)
        self.max_batch_wait_s = max(0.0, max_batch_wait_ms) / 1e3
        self.step_s = 0.0
        self.last: list[Sequence] = []
        self.returns: weakref.WeakKeyDictionary[Sequence, Return] = weakref.WeakKeyDictionary()
        self.waits, self.wait_ns = 0, 0
        self.on_wait: Callable[[int], None] | None = None
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
    def compiled(self) -> bool:
        return self.static is not None and self.static.broken is None

    def serving_warm_up(self) -> Callable[[], float] | None:
        """What a server runs before it says SERVING (specdec/serving.py): ``warm_up`` when the
        steps are compiled, else None, and the port opens SERVING at once."""
        return self.warm_up if self.compiled else None

    def warm_up(self) -> float:
        """Compile (and on CUDA record) the compiled step's shapes ahead of traffic. Scratch
        sessions run through the step loop itself (CUDA graphs belong to the thread that
        records them): 1 to 16 rows, rows that want every token's logits (verify windows) or
        only the last one's (a draft catching up). On the CPU widths 1, 2, 4 at one context
        cover every shape family; on CUDA every width bucket at contexts 64, 256 and 1024 is
        recorded (each a CUDA graph of one compile). The servers call this before they
        report SERVING (specdec/serving.py); without compiled steps there is nothing to do."""
        if self.static is None:
            return 0.0
        log.info("%s engine: building the compiled steps before serving", self.name)
        t0 = time.perf_counter()
        vocab = self.model.config.vocab_size
        shapes = [(1, 1), (4, 4), (2, 1)]  # (tokens, logits kept) per row
        contexts = (64,)
        if self.static.cuda:
            shapes = [(n, n) for n in static_step.WIDTH_BUCKETS]  # K is padded like N
            contexts = (64, 256, 1024)
        for c in contexts:
            for n, k in shapes:
                for b in (1, 2, 4, 8, 16):
                    if b * (c + self.store.page_size) > self.store.free_tokens:
                        break  # a small store: the shapes it can hold are enough
                    seqs = [Sequence(self, [], "verify") for _ in range(b)]
                    try:
                        for q in seqs:
                            self.store.reserve(q.slots, c)
                            q.slots.cached = c - n  # scratch K/V: only the shapes matter
                        self._together([Work(q, "verify", [(i + j) % vocab for j in range(n)],
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

    def sequence(self, ids: list[int], kind: str = "verify") -> Sequence | HFSequence:
        """A new session's sequence; ``kind`` is the priority of its steps after the prefill."""
        if not self.batched:
            return HFSequence(self, ids)
        if self.store.free_tokens < len(ids) + 1:
            raise StoreFull(f"KV store full: {self.store.free_tokens} of {self.store.tokens} "
                            f"token slots free, the prompt needs {len(ids) + 1} "
                            "(--kv-cache-tokens); retry later")
        return Sequence(self, ids, kind)

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
            for w in works:
                w.seq.busy = True
            self.pending.extend(works)
            self.cv.notify()

    def release(self, seq: Sequence) -> None:
        """Give a session's pages back, now or, while a step of its runs, when that step ends:
        a stream cancelled mid-step must not hand its pages to a neighbour still written to."""
        with self.cv:
            seq.closing = True
            for w in [w for w in self.pending if w.seq is seq and w not in self.running]:
                self.pending.remove(w)
                w.future.set_exception(RuntimeError("the session is closed"))
                seq.busy = False
            if not seq.busy:
                self.store.release(seq.slots, seq.ids)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for w in self.pending:
                w.future.set_exception(RuntimeError(f"the {self.name} engine is closed"))
            self.pending.clear()
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- the step loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.pending and not self.closed:
                    self.cv.wait()
                waited = self._coalesce()
                if self.closed:
                    return
                batch = self._take()
                self.running = [w for w, _ in batch]
            if waited is not None and self.on_wait is not None:
                self.on_wait(waited)
            if batch:
                t0 = time.perf_counter()
                try:
                    self._step(batch)
                finally:
                    self._settle(time.perf_counter() - t0)

    def _settle(self, step_s: float) -> None:
        """After a step: mark finished works' sessions idle (unless they already queued their
        next work); free the pages of closed ones; note who took part, for the next wait."""
        with self.cv:
            self.step_s += STEP_EMA * (step_s - self.step_s) if self.step_s else step_s
            queued = {id(p.seq) for p in self.pending}
            now = time.perf_counter_ns()
            self.last = []
            for w in self.running:
                if w.future.done():
                    if id(w.seq) not in queued:
                        w.seq.busy = False
                    if w.seq.closing:
                        if w.seq.slots.pages:
                            self.store.release(w.seq.slots, w.seq.ids)
                        continue
                    r = self.returns.setdefault(w.seq, Return())
                    r.done_ns, r.out = now, True
                    self.last.append(w.seq)
            self.running = []

    def _coalesce(self) -> int | None:
        """Before a step (under the cv lock): wait for the sessions of the last step that have
        not queued their next work yet, so that sessions taking turns (a round trip through the
        coordinator between two verifies, an event-loop hop between two draft steps) share a
        step instead of alternating. At most min(--max-batch-wait-ms, WAIT_FRACTION of the
        recent step time), ended as soon as every one of them has queued or closed; only for
        sessions that usually come back within that time (``Return.quick``). A session that
        does not come back is waited for once: it is not of the step that follows. Returns the
        time waited in ns, or None when there was nothing to wait for."""
        last, self.last = self.last, []
        if self.closed or not self.max_batch_wait_s:
            return None
        budget = int(min(self.max_batch_wait_s, WAIT_FRACTION * self.step_s) * 1e9)
        self._returned(budget)
        expected = [s for s in last if self.returns[s].out and not s.closing
                    and self.returns[s].quick >= RETURN_MIN]
        queued = sum(len(w.tokens) - w.fed for w in self.pending)
        if budget <= 0 or not expected or queued >= self.max_batch_tokens:
            return None
        t0 = time.perf_counter_ns()
        deadline = t0 + budget
        while not self.closed:
            left = deadline - time.perf_counter_ns()
            if left <= 0 or all(s.closing or not self.returns[s].out for s in expected):
                break
            self.cv.wait(left / 1e9)  # submit() notifies
            self._returned(budget)
        waited = time.perf_counter_ns() - t0
        self.waits += 1
        self.wait_ns += waited
        return waited

    def _returned(self, budget_ns: int) -> None:
        """Note the sessions whose next work has arrived, and whether it came within the wait."""
        for w in self.pending:
            r = self.returns.get(w.seq)
            if r is not None and r.out:
                r.out = False
                r.quick += RETURN_EMA * ((w.submitted_ns - r.done_ns <= budget_ns) - r.quick)

    def _take(self) -> list[tuple[Work, int]]:
        """The works of the next step and how many tokens each feeds (under the cv lock)."""
        for w in [w for w in self.pending if w.seq.closing]:
            self.pending.remove(w)
            w.future.set_exception(RuntimeError("the session is closed"))
            w.seq.busy = False
            self.store.release(w.seq.slots, w.seq.ids)
        for w in [w for w in self.pending if w.abort is not None and w.abort.is_set()]:
            self.pending.remove(w)
            w.seq.busy = False
            w.future.set_exception(Aborted())
        order = sorted(self.pending, key=lambda w: (w.kind != "prefill" or w.waited
                                                    < STARVE_STEPS, PRIORITY[w.kind],
                                                    w.submitted_ns))
        budget, batch = self.max_batch_tokens, []
        for w in order:
            left = len(w.tokens) - w.fed
            n = left
            if w.kind == "prefill" and w.commit and left > budget:  # a chunk; the last one
                n = min(budget, left - len(w.keep))  # holds the kept positions
            if n <= 0 or (n > budget and batch):
                w.waited += 1
                continue
            batch.append((w, n))
            budget -= n
        for w, n in batch:
            if w.fed + n == len(w.tokens):
                self.pending.remove(w)
        return batch

    def _step(self, batch: list[tuple[Work, int]]) -> None:
        rows: list[tuple[Work, int, Row]] = []
        for w, n in batch:
            final = w.fed + n == len(w.tokens)
            extra = len(w.pseudo.under) * w.pseudo.k if w.pseudo else 0
            try:
                self.store.reserve(w.seq.slots, w.seq.slots.cached + n + extra)
            except StoreFull as e:
                self._fail(w, e)
                continue
            keep = [k - w.fed for k in w.keep] if final else []  # into this chunk's tokens
            rows.append((w, n, Row(w.seq.slots, w.tokens[w.fed : w.fed + n], keep, w.rope,
                                   w.mask, w.pseudo, w.abort)))
        if not rows:
            return
        tokens = sum(n for _, n, _ in rows)
        started_unix_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        try:
            self._forward([r for _, _, r in rows])
            if self.store.device.type == "cuda":
                torch.cuda.synchronize(self.store.device)
        except Exception as e:  # a bug or an out-of-memory: fail this step's works, go on
            log.exception("%s engine step failed", self.name)
            for w, _, _ in rows:
                self._fail(w, e)
            return
        step_ns = time.perf_counter_ns() - t0
        self.steps += 1
        self.rows_seen[len(rows)] += 1
        if self.on_step is not None:
            self.on_step(len(rows), tokens, step_ns)
        for w, n, r in rows:
            w.forward_ns += step_ns
            if r.aborted:
                self._fail(w, Aborted())
                continue
            if w.commit:
                w.seq.slots.cached += n
            w.fed += n
            if w.fed < len(w.tokens):
                continue  # a prefill chunk: the work stays pending
            waited = time.perf_counter_ns() - w.submitted_ns - w.forward_ns
            w.future.set_result(Forward(
                r.out, w.seq.start_of(w), len(w.tokens), w.forward_ns, started_unix_ns,
                batch_rows=len(rows), batch_tokens=tokens, queue_ns=max(0, waited)))

    def _forward(self, rows: list[Row]) -> None:
        """The compiled step when every row fits it, else the eager one. A compiled step that
        fails (a backend that cannot build it) is logged once and never tried again."""
        if self.static is not None and self.static.fits(rows):
            try:
                return self.static.forward(rows)
            except Exception as e:
                log.exception("%s engine: the compiled step failed; eager steps from now on",
                              self.name)
                self.static.broken = e
                for r in rows:
                    r.out, r.aborted = None, False
        batch_forward.forward(self.model, self.store, rows)

    def _fail(self, w: Work, e: Exception) -> None:
        with self.cv:
            if w in self.pending:
                self.pending.remove(w)
        if not w.future.done():
            w.future.set_exception(e)


class Sequence(TokenIds):
    """Token ids plus their slots in the engine's KV store (the CachedSequence interface).

    ``ids[:cached]`` have their K/V in the store; ``forward`` feeds the rest. ``truncate`` is a
    length change. ``close`` gives the pages back (the servicer calls it when the stream ends).
    """

    def __init__(self, engine: Engine, ids: list[int], kind: str):
        self.engine = engine
        self.model = engine.model
        self.ids = list(ids)
        self.kind = kind
        self.slots = BlockTable()
        self.busy = False  # a work of this session is pending or running (engine.cv guards)
        self.closing = False

    @property
    def cached(self) -> int:
        return self.slots.cached

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens; the store keeps at most their K/V (a length change;
        cached pages that slots n.. lie in are copied first: they are shared)."""
        self._cut(n)
        self.slots.cached = min(self.slots.cached, n)
        self.engine.store.unshare(self.slots, n)

    def start_of(self, w: Work) -> int:
        """Position predicted by the first kept logits row of a plain work."""
        return len(self.ids) - len(w.keep) + 1

    def forward(self, keep: int = 1, abort: threading.Event | None = None) -> Forward:
        """Feed ``ids[cached:]``; logits [keep, vocab] for the last ``keep`` fed positions.

        Raises Aborted (sequence unchanged) when ``abort`` is set before the step is done."""
        if not self.slots.pages:  # the prefill: what the prefix cache holds is not fed again
            return self._prefill(len(self.ids), keep, abort)
        feed = self.ids[self.cached :]
        if not feed:
            raise ValueError("nothing to feed: the whole sequence is cached")
        keep = min(keep, len(feed))
        kind = "prefill" if self.cached == 0 else self.kind
        return self.engine.submit(Work(self, kind, feed, list(range(len(feed) - keep, len(feed))),
                                       abort=abort))

    def fill(self, upto: int) -> Forward:
        """Feed ``ids[cached:upto]`` without asking for logits (a prefill that only fills the
        store; Hidden Transfer feeds its last prompt token as a tree root)."""
        if not self.slots.pages:
            return self._prefill(upto, 0, None)
        feed = self.ids[self.cached : upto]
        if not feed:
            raise ValueError("nothing to feed: the whole sequence is cached")
        return self.engine.submit(Work(self, "prefill", feed, []))

    def _prefill(self, upto: int, keep: int, abort: threading.Event | None) -> Forward:
        """Feed ``ids[:upto]`` less the pages the prefix cache holds (at least the ``keep``
        last tokens, whose logits are wanted), then cache the pages it filled. While another
        session's prefill fills the next page of the same prefix, wait for it first."""
        store, ids = self.engine.store, self.ids[:upto]
        if not ids:
            raise ValueError("nothing to feed: the sequence is empty")
        deadline = time.monotonic() + PREFIX_WAIT_S
        while True:
            with self.engine.cv:  # not while release() gives the pages back
                if self.closing:
                    raise RuntimeError("the session is closed")
                filling = store.lookup(self.slots, ids, time.monotonic() < deadline)
            if filling is None:
                break
            filling.wait(max(0.0, deadline - time.monotonic()))
        keep = min(max(keep, 0), len(ids))
        if self.slots.cached > len(ids) - keep:  # a whole cached prompt: feed its last tokens
            self.slots.cached = len(ids) - keep
            store.unshare(self.slots, self.slots.cached)
        reused = self.slots.cached
        if store.prefix_cache and self.engine.on_prefix is not None:
            self.engine.on_prefix(reused, len(ids))
        feed = ids[reused:]
        if not feed:  # all of it cached (a fill): nothing to run
            return Forward(torch.empty(0), upto + 1, 0, 0, time.time_ns(), reused=reused)
        try:
            f = self.engine.submit(Work(self, "prefill", feed,
                                        list(range(len(feed) - keep, len(feed))), abort=abort))
        except BaseException:
            store.abandon(self.slots)
            raise
        with self.engine.cv:  # not while release() gives the pages back
            store.keep(self.slots, self.ids)
        f.reused = reused
        return f

    def tree(self, tokens: list[int], rope: list[int], mask: torch.Tensor, keep: list[int],
             pseudo: Pseudo | None, prefill: bool = False) -> Forward:
        """Feed tree nodes after the cached prefix (Hidden Transfer); the cached length is not
        advanced: ``compact`` keeps the accepted nodes."""
        kind = "prefill" if prefill else "verify"
        return self.engine.submit(Work(self, kind, tokens, keep, rope, mask, pseudo,
                                       commit=False))

    def compact(self, nodes: list[int]) -> None:
        """Keep the given nodes of the last tree forward after the prefix, in that order."""
        P = self.slots.cached
        self.engine.store.move(self.slots, [P + n for n in nodes], P)
        self.slots.cached = P + len(nodes)

    def close(self) -> None:
        self.engine.release(self)


class HFSequence(CachedSequence):
    """transformers' own forward and DynamicCache, one session at a time (other architectures)."""

    def __init__(self, engine: Engine, ids: list[int]):
        super().__init__(engine.model, ids)
        self.engine = engine

    def forward(self, keep: int = 1, abort: threading.Event | None = None) -> Forward:
        with self.engine.lock:
            return super().forward(keep, abort)

    def close(self) -> None:
        self.cache = None


_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


def engine_for(model_or_engine: torch.nn.Module | Engine) -> Engine:
    """``model_or_engine`` if it is an Engine, else the default engine of that model (made once;
    used by sessions built directly on a model, as in tests and `pearl transfer`)."""
    if isinstance(model_or_engine, Engine):
        return model_or_engine
    with _engines_lock:
        engine = _engines.get(model_or_engine)
        if engine is None:
            engine = _engines[model_or_engine] = Engine(model_or_engine, 16_384)
        return engine


def describe_engine(engine: Engine) -> str:
    """One line for the service log."""
    if not engine.batched:
        return "engine: transformers' forward, one session at a time (not a Llama-family model)"
    s = engine.store
    return (f"engine: batched{', compiled' if engine.compiled else ''}, KV store {s.tokens} tokens x {s.bytes_per_token} B "
            f"({s.tokens * s.bytes_per_token / 2**20:.0f} MiB), {engine.max_batch_tokens} "
            "tokens per step, "
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
