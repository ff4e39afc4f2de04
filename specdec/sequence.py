"""A session's token sequence, whose K/V cover a prefix of it and roll back to any position.

    TokenSequence   the token ids; a subclass keeps the K/V of ``ids[:cached]`` in step with them
    PagedSequence   K/V in the engine's KV store pages; ``forward`` submits a Work to the
                    engine's step loop (specdec/engine.py), batched with other sessions
    HFSequence      transformers' own forward and DynamicCache, one forward at a time (models
                    outside the Llama family, and the tests' reference)

``forward`` feeds the uncached tail and returns a ``Forward``; ``truncate`` is the rollback.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from specdec.kv_store import BlockTable
from specdec.scheduler import Work, WorkKind

if TYPE_CHECKING:
    from specdec.batch_forward import Pseudo
    from specdec.engine import Engine

PREFIX_WAIT_S = 30.0  # longest wait for another session's prefill of the same prefix


class Aborted(Exception):
    """A forward pass given up between two decoder layers because its abort event was set."""


_current = threading.local()  # .abort: the Event of the forward running on this thread


def _check_abort(module, args) -> None:
    abort = getattr(_current, "abort", None)
    if abort is not None and abort.is_set():
        raise Aborted


def make_abortable(model: torch.nn.Module) -> None:
    """Let ``HFSequence.forward(abort=event)`` stop ``model`` between two decoder layers.

    A draft forward whose token a rollback has made stale is worth nothing; stopping it at the
    next layer instead of the end saves half a draft step per rejection on average. Installs one
    pre-hook per decoder layer (once per model; models without ``.model.layers`` run to the end).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model, "_pearl_abortable", False):
        return
    for layer in layers:
        layer.register_forward_pre_hook(_check_abort)
    model._pearl_abortable = True


@dataclass
class Forward:
    """The outcome of one forward pass."""

    logits: torch.Tensor  # [keep, vocab] float32: logits[i] predicts position start + i
    start: int  # position predicted by logits[0]
    input_tokens: int  # tokens fed in this pass
    forward_ns: int  # duration of the pass (of the engine steps it took part in)
    started_unix_ns: int  # wall-clock start of the pass
    batch_rows: int = 1  # sessions in the (last) engine step that ran it
    batch_tokens: int = 0  # tokens fed in that step, all sessions together
    queue_ns: int = 0  # time spent waiting for a step
    reused: int = 0  # a prefill: leading tokens whose K/V the prefix cache held (not fed)


class TokenSequence:
    """A session's token ids; a subclass keeps the K/V of ``ids[:cached]`` in step with them."""

    ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: list[int]) -> None:
        self.ids.extend(ids)

    def _cut(self, n: int) -> None:
        """Keep the first ``n`` ids (the subclass then cuts its cache to match)."""
        if n < 0 or n > len(self.ids):
            raise ValueError(f"cannot truncate a sequence of {len(self.ids)} tokens to {n}")
        del self.ids[n:]


class HFSequence(TokenSequence):
    """Token ids plus transformers' DynamicCache over ``ids[:cached]``; one forward at a time
    under ``lock`` (the engine's, which runs every such session of its model in turn).

    ``truncate`` rolls both back; ``forward`` feeds the uncached tail. The cache never holds a
    token that is not in ``ids``, so a rolled-back sequence computes exactly what a fresh one would.
    """

    def __init__(self, model: torch.nn.Module, ids: list[int],
                 lock: threading.Lock | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.ids = list(ids)
        self.cache = DynamicCache(config=model.config)
        self.cached = 0
        self.lock = lock or threading.Lock()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens; crop the KV cache to match."""
        self._cut(n)
        if self.cached > n:
            self.cache.crop(n - self.cached)  # transformers 5: a negative count removes tokens
            self.cached = n

    @torch.inference_mode()
    def forward(self, keep: int = 1, abort: threading.Event | None = None) -> Forward:
        """Feed ``ids[cached:]``; return logits for the last ``keep`` fed positions.

        With ``abort`` (and ``make_abortable(model)``), raise Aborted when the event is set
        before the pass ends; the sequence and its cache are then as they were before the call.
        """
        with self.lock:
            return self._forward(keep, abort)

    def _forward(self, keep: int, abort: threading.Event | None) -> Forward:
        feed = self.ids[self.cached :]
        if not feed:
            raise ValueError("nothing to feed: the whole sequence is cached")
        keep = min(keep, len(feed))
        started_unix_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        input_ids = torch.tensor([feed], dtype=torch.long, device=self.device)
        _current.abort = abort
        try:
            out = self.model(
                input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                logits_to_keep=keep
            )
        except Aborted:
            for layer in self.cache.layers:  # the layers that ran appended the fed tokens
                extra = layer.get_seq_length() - self.cached if layer.is_initialized else 0
                if extra > 0:
                    layer.crop(-extra)
            raise
        finally:
            _current.abort = None
        logits = out.logits[0, -keep:].float()  # [keep, vocab]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        forward_ns = time.perf_counter_ns() - t0
        self.cached = len(self.ids)
        return Forward(logits, len(self.ids) - keep + 1, len(feed), forward_ns, started_unix_ns)

    def close(self) -> None:
        self.cache = None


class PagedSequence(TokenSequence):
    """Token ids plus their slots in the engine's KV store.

    ``ids[:cached]`` have their K/V in the store; ``forward`` feeds the rest. ``truncate`` is a
    length change. ``close`` gives the pages back (the servicer calls it when the stream ends).
    """

    def __init__(self, engine: Engine, ids: list[int], kind: WorkKind):
        self.engine = engine
        self.model = engine.model
        self.ids = list(ids)
        self.kind = kind
        self.slots = BlockTable()
        self.closing = False  # closed by its session (set under the engine's cv)

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
        kind = WorkKind.PREFILL if self.cached == 0 else self.kind
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
        return self.engine.submit(Work(self, WorkKind.PREFILL, feed, []))

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
            f = self.engine.submit(Work(self, WorkKind.PREFILL, feed,
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
        kind = WorkKind.PREFILL if prefill else WorkKind.VERIFY
        return self.engine.submit(Work(self, kind, tokens, keep, rope, mask, pseudo,
                                       commit=False))

    def compact(self, nodes: list[int]) -> None:
        """Keep the given nodes of the last tree forward after the prefix, in that order."""
        P = self.slots.cached
        self.engine.store.move(self.slots, [P + n for n in nodes], P)
        self.slots.cached = P + len(nodes)

    def close(self) -> None:
        self.engine.release(self)
