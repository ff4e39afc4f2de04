"""Compiled steps (``--compile``): a whole decode or verify step as one compiled graph.

The eager step (specdec/batch_forward.py) attends feed by feed in Python: feeds x layers small
kernel launches, which bound a GPU step long before the weights' memory traffic does
(docs/benchmarks-gpu.md). Here every feed of a step is padded to one rectangle and the whole pass
(embedding, every layer, attention over the paged store, LM head) is one ``torch.compile``d
function of a few index tensors, so a GPU replays it as one CUDA graph:

    ids, pos, at   [B, N]     the feeds' new tokens, rotary positions, store rows to write
    ctx            [B, C]     store rows of each feed's slots 0..C-1 (the trash page past its pages)
    limit          [B, N]     a token sees slots 0..limit (its cached prefix, then causal)
    keep           [B, K]     which of a feed's N tokens want logits
    -> logits      [B * K, vocab] float32

Padding (feeds past the live ones, tokens past a feed's own, slots past its pages) reads and writes
only the store's trash page (specdec/kv_store.py), so it cannot touch a live session's cache.

Compiled with dynamic shapes, so that one compile serves a family of shapes (dynamo specializes
sizes of 1: on the CPU, where nothing is padded, a one-feed or one-token step is a family of its
own, six in all). On CUDA, ``mode="reduce-overhead"`` records a CUDA graph per concrete shape, so
B, N, K and C are rounded up to buckets (all >= 2: one compile) and a few dozen graphs are
recorded. The README has the measured difference to the eager step on the CPU.

Only plain feeds take this path: causal, no tree mask, no pseudo tokens, at most ``MAX_WIDTH``
tokens (decode steps, draft steps, verify windows). Prefill chunks and Hidden Transfer's trees
run eagerly. A feed whose abort is set while the graph runs is dropped after it (the eager path
drops it between layers); its store writes lie past its cached length and are never read.
"""

from __future__ import annotations

import threading

import torch
import torch.fx.experimental._config
import torch.nn.functional as F

from specdec.batch_forward import Feed, head_dim, rope
from specdec.kv_store import KVStore

MAX_WIDTH = 16  # tokens per feed: longer feeds (prefill chunks) run eagerly
# CUDA buckets start at 2: dynamo compiles a size of 1 as a shape family of its own, so with
# every size >= 2 one compile serves every step (a padded feed or token is nearly free on a GPU)
FEED_BUCKETS = (2, 4, 8, 16, 32, 64, 128)
WIDTH_BUCKETS = (2, 4, 8, 16)
RECOMPILE_LIMIT = 64  # shape families compiled per process (all engines), before giving up


_thread = threading.local()


def _compile_settings() -> None:
    """Dynamo's settings are context variables, so per thread: set on the thread that runs the
    steps (the engine's), once."""
    if getattr(_thread, "set", False):
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    # sizes that happen to be equal at the first call (2 feeds of 2 tokens) stay separate sizes,
    # or the next step of another shape would compile again
    torch.fx.experimental._config.use_duck_shape = False
    _thread.set = True


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


class StaticStep:
    """The compiled step of one engine. ``buckets`` (default: on CUDA) pads B, N, K and C up to
    the buckets; ``compiled=False`` runs the same graph function eagerly (tests of the padding
    and indexing without a compile). ``steps`` counts the steps run here."""

    def __init__(self, model: torch.nn.Module, store: KVStore, buckets: bool | None = None,
                 compiled: bool = True):
        self.model, self.store = model, store
        cfg = model.config
        self.heads, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = head_dim(cfg)
        self.cuda = store.device.type == "cuda"
        self.buckets = self.cuda if buckets is None else buckets
        self.steps = 0
        self.broken: Exception | None = None
        if not compiled:
            self._run = self._graph
            return
        if self.cuda:
            for t in (*store.k, *store.v):  # written in place inside the CUDA graphs
                torch._dynamo.mark_static_address(t)
        # Dynamic shapes on both: one compile per family of shapes (sizes of 1 are their own
        # family), not one per bucket; on CUDA each bucket is then recorded as its own CUDA graph.
        # Only the step's index tensors have dynamic sizes (marked in ``forward``): with
        # ``dynamic=True`` the model's head counts would be symbols too, and guards tying them
        # to a step size would compile again.
        self._run = torch.compile(self._graph, fullgraph=True,
                                  mode="reduce-overhead" if self.cuda else None)

    def fits(self, feeds: list[Feed]) -> bool:
        """True when every feed is a plain causal one short enough for the compiled step."""
        return self.broken is None and all(
            r.mask is None and r.pseudo is None and r.rope is None
            and 0 < len(r.tokens) <= MAX_WIDTH for r in feeds)

    @torch.inference_mode()
    def forward(self, feeds: list[Feed]) -> None:
        """Fill each feed's ``out`` (or mark it ``aborted``), as batch_forward.forward does."""
        _compile_settings()
        store, ps, dev = self.store, self.store.page_size, self.store.device
        B, N = len(feeds), max(len(r.tokens) for r in feeds)
        K = max(max(len(r.keep) for r in feeds), 1)
        C = max(r.slots.cached + len(r.tokens) for r in feeds)
        if self.buckets:  # few shapes, each recorded once as a CUDA graph
            B, N, K = _bucket(B, FEED_BUCKETS), _bucket(N, WIDTH_BUCKETS), _bucket(K, WIDTH_BUCKETS)
            C = max(64, 1 << (C - 1).bit_length())
        pages = -(-C // ps)
        trash_row = store.trash * ps
        ids = [[0] * N for _ in range(B)]
        pos = [[0] * N for _ in range(B)]
        at = [[trash_row] * N for _ in range(B)]
        limit = [list(range(N)) for _ in range(B)]  # padded feeds see trash slots 0..j
        keep = [[0] * K for _ in range(B)]
        table = [[store.trash] * pages for _ in range(B)]
        for b, r in enumerate(feeds):
            P, n = r.slots.cached, len(r.tokens)
            own = r.slots.pages[:pages]
            table[b][: len(own)] = own
            ids[b][:n] = r.tokens
            for j in range(N):
                pos[b][j] = P + j if j < n else 0
                limit[b][j] = P + j
            for j in range(n):
                at[b][j] = store.row(r.slots, P + j)
            keep[b][: len(r.keep)] = r.keep
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        pages_t = t(table)  # [B, pages]
        # contiguous: a slice's row stride would be a size of its own to guard on
        ctx = (pages_t[:, :, None] * ps + torch.arange(ps, device=dev)).reshape(B, -1)[:, :C]
        ctx = ctx.contiguous()
        args = [t(ids), t(pos), t(at), ctx, t(limit), t(keep)]
        for a in args:  # B, N, K, C: dynamic from the first compile (a size of 1 stays 1)
            torch._dynamo.maybe_mark_dynamic(a, 0)
            torch._dynamo.maybe_mark_dynamic(a, 1)
        logits = self._run(*args, store.k, store.v)
        logits = logits.view(B, K, -1)
        self.steps += 1
        for b, r in enumerate(feeds):
            if r.abort is not None and r.abort.is_set():
                r.aborted = True
            else:  # a copy: a CUDA graph's output buffer is overwritten by its next replay
                r.out = logits[b, : len(r.keep)].clone()

    def _graph(self, ids, pos, at, ctx, limit, keep, ks, vs):
        """The whole step; shapes in the module docstring. The per-token math runs on the flat
        [T = B * N, ...] rows (as in the eager step), so that no view keeps B or N beside a
        model constant: the compiler would guard a step size equal to that constant (two feeds
        and two K/V heads) and compile again for the next size."""
        m, heads, kvh, hd = self.model.model, self.heads, self.kvh, self.hd
        B, N = ids.shape
        h = m.embed_tokens(ids.reshape(-1))  # [T, hidden]
        cos, sin = (c[0] for c in m.rotary_emb(h[None], pos.reshape(1, -1)))  # [T, hd]
        at = at.reshape(-1)
        # a token sees slot c when c <= its limit: [B, 1, N, C]
        mask = (torch.arange(ctx.shape[1], device=ids.device) <= limit[..., None])[:, None]
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = rope(a.q_proj(x).view(-1, heads, hd), cos, sin)  # [T, heads, hd]
            k = rope(a.k_proj(x).view(-1, kvh, hd), cos, sin)  # [T, kvh, hd]
            ks[li].index_copy_(0, at, k)
            vs[li].index_copy_(0, at, a.v_proj(x).view(-1, kvh, hd))
            K = ks[li][ctx].transpose(1, 2)  # [B, kvh, C, hd]
            V = vs[li][ctx].transpose(1, 2)
            if kvh != heads:  # grouped-query attention: each K/V head serves heads // kvh
                K = K.repeat_interleave(heads // kvh, dim=1)
                V = V.repeat_interleave(heads // kvh, dim=1)
            o = F.scaled_dot_product_attention(q.view(B, N, heads, hd).transpose(1, 2), K, V,
                                               attn_mask=mask, scale=a.scaling)  # [B, heads, N, hd]
            h = h + a.o_proj(o.transpose(1, 2).reshape(-1, heads * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        rows = (torch.arange(B, device=ids.device)[:, None] * N + keep).reshape(-1)  # [B * K]
        return self.model.lm_head(m.norm(h[rows])).float()  # [B * K, vocab]
