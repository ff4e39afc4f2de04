"""One forward pass over a ragged batch: every session's new tokens in one pass over the weights.

For Llama-family decoders (Qwen2, Llama, Mistral: pre-norm layers of rotary attention and a
gated MLP). The model's own modules do the per-token math (embeddings, norms, projections, MLP,
rotary tables, LM head); only attention is done here, per feed, against that feed's pages of
the engine's KV store (specdec/kv_store.py). So a feed's result does not depend on its
batch-mates: the linear layers see its tokens as independent rows of one matrix, and its
attention reads only its own prefix.

Same bits, whatever the shape (on the CPU). A token's numbers must not depend on how many tokens
share its step, or a seeded draw near a boundary flips between runs of one request: pearl's
windows, the batch-mates and the prefill chunks all vary with timing. They would in bfloat16:
oneDNN rounds a linear layer's lone row (M = 1) differently from the same row among others (any
M >= 2 gives the same bits, whatever the others), and the flash attention kernel rounds a
query's result by how many queries share its call and how many keys the call holds. So on the
CPU a linear layer never sees a lone row (``_two``), and a query attends in a call of exactly
``QUERIES`` queries against its visible keys rounded up to ``KEYS`` (zero and masked beyond):
shapes that are a function of the query alone (``_plan``, ``_attend``).

Words:
  feed    one session's tokens fed in this step; they continue its cached prefix of P slots
  slot    where a fed token's K/V goes in the session's store: P, P+1, ... in feed order
  rope    a token's position for the rotary embedding: its slot, except in tree feeds
  mask    which new tokens a new token sees (all P cached ones always): causal, or a tree
  pseudo  Hidden Transfer (target_service/hidden_transfer/): from layer L on, a tree feed also
          carries k made-up tokens under some of its nodes, made by the transfer maps from the
          node's layer-L input; they get slots after the feed's real tokens, in layers >= L only
  row     a row of a tensor only: a token's hidden state in the [tokens, hidden] matrix, a
          slot's place in each layer's K and V (``KVStore.rows``)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specdec.kv_store import KVStore, BlockTable

FAMILY = ("qwen2", "llama", "mistral")
QUERIES = 4  # queries per attention call (the last repeated to fill), on the CPU
KEYS = 64  # a query's keys are its visible ones rounded up to a multiple of this, on the CPU


def supports(model: torch.nn.Module) -> bool:
    """True when ``model`` is a decoder this module can run (else: transformers' own forward)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in FAMILY:
        return False
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers is not None and all(hasattr(layer.self_attn, "q_proj") for layer in layers)


def head_dim(cfg) -> int:
    """Size of one attention head (configs without ``head_dim`` split the hidden size evenly)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def store_for(model: torch.nn.Module, tokens: int, prefix_cache: bool = True) -> KVStore:
    cfg = model.config
    p = next(model.parameters())
    return KVStore(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg), tokens,
                   p.dtype, p.device, prefix_cache=prefix_cache)


@dataclass
class Pseudo:
    """Hidden Transfer's extra tokens for a tree feed (see the module docstring)."""

    transfer: torch.nn.Module  # TransferLayers: h [g, hidden] -> [g, k_all, hidden]
    under: list[int]  # node indices that get pseudo tokens
    k: int  # pseudo tokens per node
    high: torch.Tensor  # [n + g*k, P + n + g*k] bool: the mask for layers >= transfer.layer


@dataclass
class Feed:
    """One session's tokens in a step (see the module docstring); ``forward`` fills ``out``."""

    slots: BlockTable
    tokens: list[int]
    keep: list[int]  # indices (into tokens, then pseudo tokens) whose logits are wanted
    rope: list[int] | None = None  # None: slots P, P+1, ...
    mask: torch.Tensor | None = None  # [n, P + n] bool; None: causal
    pseudo: Pseudo | None = None
    abort: threading.Event | None = None  # set: the feed leaves the pass at the next layer
    out: torch.Tensor | None = field(default=None, repr=False)  # [len(keep), vocab] float32
    aborted: bool = False

    def positions(self) -> list[int]:
        p = self.slots.cached
        return self.rope if self.rope is not None else list(range(p, p + len(self.tokens)))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd]; cos, sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class _Hidden:
    """The live feeds' hidden states as one [T, hidden] matrix, with each feed's span in it."""

    def __init__(self, feeds: list[Feed], h: torch.Tensor, pos: torch.Tensor):
        self.feeds, self.h, self.pos = feeds, h, pos
        self.spans: list[tuple[int, int]] = []
        a = 0
        for r in feeds:
            n = self.width(r)
            self.spans.append((a, a + n))
            a += n

    @staticmethod
    def width(r: Feed) -> int:
        return len(r.tokens) + (len(r.pseudo.under) * r.pseudo.k if getattr(r, "_grown", False)
                                else 0)

    def select(self, keep: list[int]) -> _Hidden:
        idx = torch.cat([torch.arange(*self.spans[i], device=self.h.device) for i in keep])
        return _Hidden([self.feeds[i] for i in keep], self.h[idx], self.pos[idx])


@torch.inference_mode()
def forward(model: torch.nn.Module, store: KVStore, feeds: list[Feed]) -> None:
    """Run ``feeds`` through the model; fill each feed's ``out`` (or set ``aborted``).

    Each feed's K/V are written to its slots P.. (its ``slots.cached`` stays as it was: the caller
    commits the length); the caller has reserved those slots (``Engine._step``, which refuses a
    work the store cannot hold). Feeds whose abort event is set leave at the next decoder layer.
    """
    m, dev = model.model, store.device
    for r in feeds:
        r._grown = False
    ids = torch.tensor([t for r in feeds for t in r.tokens], device=dev)
    pos = torch.tensor([p for r in feeds for p in r.positions()], device=dev)
    b = _Hidden(feeds, m.embed_tokens(ids), pos)
    pseudo_layer = next((r.pseudo.transfer.layer for r in feeds if r.pseudo), None)
    mask_of = {id(r): _mask(r, dev) for r in feeds}
    plans = {} if dev.type == "cpu" else None  # id(feed) -> (its mask, _plan of it)
    for li, layer in enumerate(m.layers):
        b = _without_aborted(b)
        if b is None:
            return
        if li == pseudo_layer:
            b = _grow(b, mask_of)
        b.h = _layer(model, li, b, store, mask_of, plans)
    h = m.norm(b.h)
    idx = torch.tensor([a + i for r, (a, _) in zip(b.feeds, b.spans) for i in r.keep],
                       dtype=torch.long, device=dev)
    x = h[idx] if plans is None else _two(h[idx])
    logits = model.lm_head(x)[: len(idx)].float()  # one pass over the LM head for every feed
    n = 0
    for r in b.feeds:
        r.out = logits[n : n + len(r.keep)]
        n += len(r.keep)


def _without_aborted(b: _Hidden) -> _Hidden | None:
    """``b`` less the feeds whose abort is set (marked ``aborted``); None when none is left."""
    gone = [i for i, r in enumerate(b.feeds) if r.abort is not None and r.abort.is_set()]
    if not gone:
        return b
    for i in gone:
        b.feeds[i].aborted = True
    if len(gone) == len(b.feeds):
        return None
    return b.select([i for i in range(len(b.feeds)) if i not in gone])


def _layer(model, li: int, b: _Hidden, store: KVStore, mask_of: dict,
           plans: dict | None) -> torch.Tensor:
    """Decoder layer ``li`` over the batch: the new hidden states [T, hidden]. ``plans`` (on
    the CPU): each feed's attention calls (``_plan``), kept across layers."""
    cfg, layer = model.config, model.model.layers[li]
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = head_dim(cfg)
    cos, sin = (t[0] for t in model.model.rotary_emb(b.h[None], b.pos[None]))
    at, T = layer.self_attn, b.h.shape[0]
    two = _two if plans is not None else (lambda x: x)
    x = two(layer.input_layernorm(b.h))
    q = rope(at.q_proj(x)[:T].view(T, heads, hd), cos, sin)
    k = rope(at.k_proj(x)[:T].view(T, kvh, hd), cos, sin)
    v = at.v_proj(x)[:T].view(T, kvh, hd)
    outs = []
    for r, (a, e) in zip(b.feeds, b.spans):  # attention per feed, against its own pages only
        P = r.slots.cached
        store.write(li, r.slots, P, k[a:e], v[a:e])
        mk = mask_of[id(r)]
        if plans is not None:
            if id(r) not in plans or plans[id(r)][0] is not mk:
                plans[id(r)] = mk, _plan(mk, e - a, P, store.device)
            outs.append(_attend(q[a:e], store, li, r.slots, P + e - a, plans[id(r)][1],
                                at.scaling, kvh != heads).reshape(e - a, heads * hd))
            continue
        K, V = store.read(li, r.slots, P + e - a)
        o = F.scaled_dot_product_attention(  # [1, heads, n, hd]
            q[a:e].transpose(0, 1)[None], K[None], V[None],
            attn_mask=None if mk is None else mk[None, None], enable_gqa=kvh != heads,
            scale=at.scaling)
        outs.append(o[0].transpose(0, 1).reshape(e - a, heads * hd))
    h = b.h + at.o_proj(two(torch.cat(outs)))[:T]
    return h + layer.mlp(two(layer.post_attention_layernorm(h)))[:T]


def _two(x: torch.Tensor) -> torch.Tensor:
    """``x`` with at least two rows (a lone row twice): a linear layer's bits for a token are
    then the same in every step (module docstring)."""
    return torch.cat([x, x]) if x.shape[0] == 1 else x


@dataclass
class _Call:
    """One attention call of a feed: its queries whose visible keys round up to ``keys``."""

    keys: int
    sel: torch.Tensor  # [n] the queries (indices into the feed's tokens)
    idx: torch.Tensor  # [B * QUERIES] sel, the last one repeated to fill the calls
    mask: torch.Tensor  # [B, 1, QUERIES, keys] bool


def _plan(mk: torch.Tensor | None, n: int, P: int, dev: torch.device
          ) -> tuple[int, list[_Call]]:
    """A feed's attention calls (canonical shapes, module docstring): the longest key count and
    the calls. ``mk``: the feed's mask [n, P + n] (None: one token, which sees every key)."""
    L = P + n
    if mk is None:
        mk = torch.ones(1, L, dtype=torch.bool, device=dev)
    last = torch.where(mk, torch.arange(1, L + 1, device=dev), 0).amax(1)  # keys seen, and one
    keys = (last + KEYS - 1) // KEYS * KEYS
    top = int(keys.max())
    full = F.pad(mk, (0, top - L))
    calls = []
    for c in sorted(set(keys.tolist())):
        sel = (keys == c).nonzero()[:, 0]
        B = -(-len(sel) // QUERIES)
        idx = torch.cat([sel, sel[-1:].expand(B * QUERIES - len(sel))])
        calls.append(_Call(c, sel, idx, full[idx, :c].reshape(B, 1, QUERIES, c)))
    return top, calls


def _attend(q: torch.Tensor, store: KVStore, li: int, slots: BlockTable, L: int,
            plan: tuple[int, list[_Call]], scale: float, gqa: bool) -> torch.Tensor:
    """A feed's attention [n, heads, hd] in the calls of its plan: q [n, heads, hd] against the
    feed's first ``L`` slots of layer ``li``, zero beyond them up to the plan's longest."""
    top, calls = plan
    K = store.k[li].new_zeros(top, *store.k[li].shape[1:])  # [top, kvh, hd]: one layout always
    V = torch.zeros_like(K)
    at = store.rows(slots, torch.arange(L, device=store.device))
    K[:L], V[:L] = store.k[li][at], store.v[li][at]
    K, V = K.transpose(0, 1), V.transpose(0, 1)  # [kvh, top, hd]
    out = torch.empty_like(q)
    for c in calls:
        B = c.mask.shape[0]
        o = F.scaled_dot_product_attention(  # [B, heads, QUERIES, hd]
            q[c.idx].view(B, QUERIES, *q.shape[1:]).transpose(1, 2),
            K[None, :, :c.keys].expand(B, -1, -1, -1), V[None, :, :c.keys].expand(B, -1, -1, -1),
            attn_mask=c.mask, enable_gqa=gqa, scale=scale)
        out[c.sel] = o.transpose(1, 2).reshape(B * QUERIES, *q.shape[1:])[: len(c.sel)]
    return out


def _mask(r: Feed, dev: torch.device) -> torch.Tensor | None:
    """[n, P + n] bool for a feed's real tokens, or None when plain causal needs none."""
    n, P = len(r.tokens), r.slots.cached
    if r.mask is not None:
        return r.mask.to(dev)
    if n == 1:
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    return torch.cat([torch.ones(n, P, dtype=torch.bool, device=dev), causal], dim=1)


def _grow(b: _Hidden, mask_of: dict) -> _Hidden:
    """At layer L: append every tree feed's pseudo tokens after its real tokens."""
    hs, ps = [], []
    for r, (a, e) in zip(b.feeds, b.spans):
        hs.append(b.h[a:e])
        ps.append(b.pos[a:e])
        if r.pseudo is None:
            continue
        pz = r.pseudo
        under = torch.tensor(pz.under, device=b.h.device)
        hs.append(pz.transfer(b.h[a:e][under])[:, : pz.k].reshape(-1, b.h.shape[-1]))
        offsets = torch.arange(1, pz.k + 1, device=b.h.device)
        ps.append((b.pos[a:e][under][:, None] + offsets).reshape(-1))
        r._grown = True
        mask_of[id(r)] = pz.high.to(b.h.device)
    return _Hidden(b.feeds, torch.cat(hs), torch.cat(ps))
