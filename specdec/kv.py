"""A token sequence whose KV cache covers a prefix of it and rolls back to any position."""

import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache


class ProtocolError(ValueError):
    """A message that does not fit a session's state (answered with INVALID_ARGUMENT)."""


def check_prompt(prompt_ids: list[int], vocab: int, max_positions: int) -> None:
    """Raise ProtocolError naming start.prompt_ids when a session cannot start on it."""
    if not prompt_ids:
        raise ProtocolError("start.prompt_ids is empty")
    if len(prompt_ids) >= max_positions:
        raise ProtocolError(
            f"start.prompt_ids has {len(prompt_ids)} tokens; the model takes {max_positions}")
    check_ids(prompt_ids, vocab, "start.prompt_ids")


def check_ids(ids: list[int], vocab: int, field: str) -> None:
    """Raise ProtocolError naming ``field`` when a token id is outside the vocabulary."""
    if any(not 0 <= t < vocab for t in ids):
        raise ProtocolError(f"{field} holds ids outside the vocabulary of {vocab}")


class Aborted(Exception):
    """A forward pass given up between two decoder layers because its abort event was set."""


_current = threading.local()  # .abort: the Event of the forward running on this thread


def _check_abort(module, args) -> None:
    abort = getattr(_current, "abort", None)
    if abort is not None and abort.is_set():
        raise Aborted


def make_abortable(model: torch.nn.Module) -> None:
    """Let ``CachedSequence.forward(abort=event)`` stop ``model`` between two decoder layers.

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


class TokenIds:
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


class CachedSequence(TokenIds):
    """Token ids plus a KV cache over ``ids[:cached]`` (transformers' DynamicCache).

    ``truncate`` rolls both back; ``forward`` feeds the uncached tail. The cache never holds a
    token that is not in ``ids``, so a rolled-back sequence computes exactly what a fresh one would.
    """

    def __init__(self, model: torch.nn.Module, ids: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.ids = list(ids)
        self.cache = DynamicCache(config=model.config)
        self.cached = 0

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
