"""Compiled steps (``--compile``): a whole decode or verify step as one compiled graph.

The eager step (specdec/batch_forward.py) attends row by row in Python: rows x layers small
kernel launches, which bound a GPU step long before the weights' memory traffic does
(docs/benchmarks-gpu.md). Here every row of a step is padded to one rectangle and the whole pass
(embedding, every layer, attention over the paged store, LM head) is one ``torch.compile``d
function of a few index tensors, so a GPU replays it as one CUDA graph:

    ids, pos, at   [B, N]     the rows' new tokens, rotary positions, store rows to write
    ctx            [B, C]     store rows of slots 0..C-1 of each row (the trash page past its pages)
    limit          [B, N]     a token sees slots 0..limit (its cached prefix, then causal)
    keep           [B, K]     which of a row's N tokens want logits
    -> logits      [B * K, vocab] float32

Padding (rows past the live ones, tokens past a row's own, slots past its pages) reads and writes
only the store's trash page (specdec/kv_store.py), so it cannot touch a live session's cache.

Compiled with dynamic shapes, so that one compile serves a family of shapes (dynamo specializes
sizes of 1, so a decode step of one row is a family of its own: a handful in all). On CUDA,
``mode="reduce-overhead"`` records a CUDA graph per concrete shape, so B, N and C are rounded up
to buckets first and only a few dozen are ever recorded. On the CPU there is no padding (nothing
to record); the README has the measured difference to the eager step.

Only plain rows take this path: causal, no tree mask, no pseudo tokens, at most ``MAX_WIDTH``
tokens (decode steps, draft steps, verify windows). Prefill chunks and Hidden Transfer's trees
run eagerly. A row whose abort is set while the graph runs is dropped after it (the eager path
drops it between layers); its store writes lie past its cached length and are never read.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from specdec import batch_forward
from specdec.batch_forward import Row
from specdec.kv_store import KVStore

log = logging.getLogger("pearl.engine")

MAX_WIDTH = 16  # tokens per row: longer rows (prefill chunks) run eagerly
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
WIDTH_BUCKETS = (1, 2, 4, 8, 16)
RECOMPILE_LIMIT = 64  # shape families compiled per process (all engines), before giving up


def compilable(model: torch.nn.Module) -> bool:
    return batch_forward.supports(model)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, heads, hd]; cos, sin [B, N, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class StaticStep:
    """The compiled step of one engine. ``buckets`` (default: on CUDA) pads B, N, K and C up to
    the buckets; ``compiled=False`` runs the same graph function eagerly (tests of the padding
    and indexing without a compile). ``steps`` counts the steps run here."""

    def __init__(self, model: torch.nn.Module, store: KVStore, buckets: bool | None = None,
                 compiled: bool = True):
        self.model, self.store = model, store
        cfg = model.config
        self.heads, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
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
        self._run = torch.compile(self._graph, dynamic=True, fullgraph=True,
                                  mode="reduce-overhead" if self.cuda else None)

    def fits(self, rows: list[Row]) -> bool:
        """True when every row is a plain causal row short enough for the compiled step."""
        return self.broken is None and all(
            r.mask is None and r.pseudo is None and r.rope is None
            and 0 < len(r.tokens) <= MAX_WIDTH for r in rows)

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> None:
        """Fill each row's ``out`` (or mark it ``aborted``), as batch_forward.forward does."""
        # Dynamo's settings are per thread (context variables): this is the engine's thread.
        if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        store, ps, dev = self.store, self.store.page_size, self.store.device
        B, N = len(rows), max(len(r.tokens) for r in rows)
        K = max(max(len(r.keep) for r in rows), 1)
        C = max(r.slots.cached + len(r.tokens) for r in rows)
        if self.buckets:  # few shapes, each recorded once as a CUDA graph
            B, N, K = _bucket(B, ROW_BUCKETS), _bucket(N, WIDTH_BUCKETS), _bucket(K, WIDTH_BUCKETS)
            C = max(64, 1 << (C - 1).bit_length())
        pages = -(-C // ps)
        trash_row = store.trash * ps
        ids = [[0] * N for _ in range(B)]
        pos = [[0] * N for _ in range(B)]
        at = [[trash_row] * N for _ in range(B)]
        limit = [list(range(N)) for _ in range(B)]  # padded rows see trash slots 0..j
        keep = [[0] * K for _ in range(B)]
        table = [[store.trash] * pages for _ in range(B)]
        for b, r in enumerate(rows):
            P, n = r.slots.cached, len(r.tokens)
            own = r.slots.pages[:pages]
            table[b][: len(own)] = own
            ids[b][:n] = r.tokens
            for j in range(N):
                pos[b][j] = P + j if j < n else 0
                limit[b][j] = P + j
            for j in range(n):
                s = P + j
                at[b][j] = r.slots.pages[s // ps] * ps + s % ps
            keep[b][: len(r.keep)] = r.keep
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        pages_t = t(table)  # [B, pages]
        # contiguous: a slice's row stride would be a size of its own to guard on
        ctx = (pages_t[:, :, None] * ps + torch.arange(ps, device=dev)).reshape(B, -1)[:, :C]
        ctx = ctx.contiguous()
        logits = self._run(t(ids), t(pos), t(at), ctx, t(limit), t(keep), store.k, store.v)
        logits = logits.view(B, K, -1)
        self.steps += 1
        for b, r in enumerate(rows):
            if r.abort is not None and r.abort.is_set():
                r.aborted = True
            else:  # a copy: a CUDA graph's output buffer is overwritten by its next replay
                r.out = logits[b, : len(r.keep)].clone()

    def _graph(self, ids, pos, at, ctx, limit, keep, ks, vs):
        """The whole step; shapes in the module docstring."""
        m, heads, kvh, hd = self.model.model, self.heads, self.kvh, self.hd
        B, N = ids.shape
        h = m.embed_tokens(ids)  # [B, N, hidden]
        cos, sin = m.rotary_emb(h, pos)  # [B, N, hd]
        at = at.reshape(-1)
        # a token sees slot c when c <= its limit: [B, 1, N, C]
        mask = (torch.arange(ctx.shape[1], device=ids.device) <= limit[..., None])[:, None]
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = _rope(a.q_proj(x).view(B, N, heads, hd), cos, sin)
            k = _rope(a.k_proj(x).view(B, N, kvh, hd), cos, sin)
            v = a.v_proj(x).view(B, N, kvh, hd)
            ks[li].index_copy_(0, at, k.reshape(-1, kvh, hd))
            vs[li].index_copy_(0, at, v.reshape(-1, kvh, hd))
            K = ks[li][ctx].transpose(1, 2)  # [B, kvh, C, hd]
            V = vs[li][ctx].transpose(1, 2)
            if kvh != heads:  # grouped-query attention: each K/V head serves heads // kvh
                K = K.repeat_interleave(heads // kvh, dim=1)
                V = V.repeat_interleave(heads // kvh, dim=1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask,
                                               scale=a.scaling)  # [B, heads, N, hd]
            h = h + a.o_proj(o.transpose(1, 2).reshape(B, N, heads * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))  # [B, K, hidden]
        return self.model.lm_head(m.norm(h)).float().reshape(-1, self.model.config.vocab_size)
