"""Hidden Transfer (Wu et al. 2024, arXiv 2404.12022): the target drafts for itself.

Words used here and in hidden_transfer.py / transfer_train.py:

  layer L    the decoder layer whose *input* hidden states the transfer maps read
             (HF's ``hidden_states[L]``); layers L.. run on pseudo tokens too, layers < L do not.
  k          future positions drafted per forward pass.
  pseudo     ``transfer(h)[i-1]``, i = 1..k: a made-up layer-L hidden state for the token i places
             after the token whose state ``h`` is. It goes through layers L.. like a real token,
             attending to the real sequence and to the earlier pseudo tokens of the same node, and
             the model's own LM head turns it into a draft distribution for the position after it.
  node       a real token fed in a forward pass: a prompt token at prefill, or a tree node.
  tree       the root (the token the model chose last step, committed but not yet fed) and
             candidate nodes below it; a node at depth d holds a candidate for root position + d,
             taken from the root's draft distributions by the rank path that names it.
  accepted   the nodes on the longest root path whose every token is the model's own choice.

Model math only: no gRPC here. The model itself is never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class TransferLayers(nn.Module):
    """k linear maps at layer L: pseudo_i = h + up_i(down_i(h)) + bias_i, i = 1..k.

    Low rank (``rank``) keeps the weights file small (a few MB for the 1.5B target) and the maps
    hard to overfit on a few thousand self-generated tokens; ``up`` starts at zero, so an untrained
    map copies h forward (a weak but valid drafter).
    """

    def __init__(self, hidden: int, layer: int, k: int, rank: int):
        super().__init__()
        self.layer, self.k, self.rank = layer, k, rank
        self.down = nn.Parameter(torch.randn(k, hidden, rank) / hidden**0.5)
        self.up = nn.Parameter(torch.zeros(k, rank, hidden))
        self.bias = nn.Parameter(torch.zeros(k, hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, hidden] -> pseudo [n, k, hidden]"""
        low = torch.einsum("nd,kdr->nkr", h, self.down.to(h.dtype))
        return h[:, None] + torch.einsum("nkr,krd->nkd", low, self.up.to(h.dtype)) + self.bias.to(h.dtype)


@dataclass
class Transfer:
    """Trained transfer layers plus what was measured when they were trained."""

    layers: TransferLayers
    model: str  # the model they were trained for
    # rank_acceptance[d][r]: held-out frequency that the model's own token at depth d+1 is the
    # rank-r draft candidate; the tree is chosen from it (tree_paths)
    rank_acceptance: list[list[float]] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # training facts (data, steps, time, KL before/after)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.model, "layer": self.layers.layer, "k": self.layers.k,
                "rank": self.layers.rank, "rank_acceptance": self.rank_acceptance,
                "info": self.info}
        tensors = {n: p.detach().to(torch.bfloat16).contiguous()
                   for n, p in self.layers.named_parameters()}
        save_file(tensors, str(path), metadata={"pearl.transfer": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> Transfer:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("pearl.transfer")
        if raw is None:
            raise ValueError(f"{path} is not a transfer-layers file (no pearl.transfer metadata)")
        meta = json.loads(raw)
        tensors = load_file(str(path))
        hidden = tensors["bias"].shape[1]
        layers = TransferLayers(hidden, meta["layer"], meta["k"], meta["rank"])
        layers.load_state_dict({n: t.float() for n, t in tensors.items()})
        return cls(layers.eval(), meta["model"], meta.get("rank_acceptance", []),
                   meta.get("info", {}))


def tree_paths(rank_acceptance: list[list[float]], nodes: int, k: int) -> list[tuple[int, ...]]:
    """The ``nodes`` rank paths most likely to be accepted, prefix-closed, shortest first.

    A path (r1, .., rd) names the node whose token at depth i is the rank-ri candidate of the
    depth-i draft distribution; its score is the product of the per-depth rank frequencies (the
    depths taken as independent). A path scores at most its prefix, so the best set is
    prefix-closed (Medusa's sparse-tree rule, here with measured frequencies).
    """
    scored: list[tuple[float, tuple[int, ...]]] = []
    frontier = [(1.0, ())]
    while frontier:  # expand every path whose score could still make the cut
        score, path = frontier.pop()
        d = len(path)
        if d == k or d >= len(rank_acceptance):
            continue
        for r, a in enumerate(rank_acceptance[d]):
            child = (score * a, path + (r,))
            scored.append(child)
            if len(scored) < 50_000:
                frontier.append(child)
    scored.sort(key=lambda c: (-c[0], len(c[1]), c[1]))
    chosen = [p for s, p in scored[:nodes] if s > 0]
    chosen_set = set(chosen)
    chosen = [p for p in chosen if all(p[:i] in chosen_set for i in range(1, len(p)))]
    return sorted(chosen, key=lambda p: (len(p), p))


def chain_paths(k: int) -> list[tuple[int, ...]]:
    """The top-1 chain (0,), (0, 0), ...: the tree when nothing has been measured."""
    return [(0,) * d for d in range(1, k + 1)]


class TreeKV:
    """Per-layer K/V of the real tokens fed so far, plus whatever the last forward appended.

    Layers >= L also hold the pseudo tokens of the last forward; ``keep`` cuts every layer back
    to the committed prefix plus the accepted nodes (KV compaction). Duck-types the
    ``update(key, value, layer_idx)`` of transformers' caches, which is all a decoder layer calls.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # committed positions every layer holds

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value [1, kv_heads, new, head_dim]
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = key, value
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], key], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], value], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def keep(self, nodes: list[int]) -> None:
        """Keep the committed prefix plus the given nodes of the last forward, in that order."""
        idx = None
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            if idx is None or idx.device != k.device:
                idx = torch.tensor(list(range(self.length)) + [self.length + n for n in nodes],
                                   device=k.device)
            self.k[layer] = k.index_select(2, idx)
            self.v[layer] = v.index_select(2, idx)
        self.length += len(nodes)


@dataclass
class TreeOut:
    """Final-norm hidden states of one forward; logits are taken on demand (the LM head is
    the costliest single matrix, and only the walked nodes and one node's pseudo tokens need it)."""

    nodes: torch.Tensor  # [n, hidden]
    pseudo: torch.Tensor  # [len(pseudo_for), k, hidden]
    pseudo_for: list[int]  # node index of each pseudo group
    forward_ns: int = 0


def ancestors(parents: list[int]) -> torch.Tensor:
    """anc[j, m] = node m is node j or one of its ancestors; parents[j] < j, -1 for none."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for j, p in enumerate(parents):
        if p >= 0:
            if p >= j:
                raise ValueError(f"node {j} has parent {p}: parents must come first")
            anc[j] |= anc[p]
    return anc


def tree_masks(parents: list[int], prefix: int, pseudo_for: list[int], k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention masks (True = attend) for one forward.

    low  [n, prefix + n]: node j sees the prefix and its ancestors (itself included).
    high [n + g*k, prefix + n + g*k] for layers >= L, g = len(pseudo_for): pseudo i of node j
         sees what j sees, j itself, and pseudo 1..i of j.
    """
    n, g = len(parents), len(pseudo_for)
    anc = ancestors(parents)
    low = torch.cat([torch.ones(n, prefix, dtype=torch.bool), anc], dim=1)
    rows = n + g * k
    high = torch.zeros(rows, prefix + rows, dtype=torch.bool)
    high[:n, : prefix + n] = low
    causal = torch.tril(torch.ones(k, k, dtype=torch.bool))
    for gi, j in enumerate(pseudo_for):
        r0 = n + gi * k
        high[r0 : r0 + k, : prefix + n] = low[j]
        high[r0 : r0 + k, prefix + r0 : prefix + r0 + k] = causal
    return low, high


def run_layers(model, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: TreeKV,
            layers: range) -> torch.Tensor:
    """Run decoder layers ``layers`` on h [1, rows, hidden] at ``positions`` [rows]."""
    pos = positions[None]
    rope = model.model.rotary_emb(h, pos)
    mask = mask[None, None].to(h.device)
    for i in layers:
        h = model.model.layers[i](h, attention_mask=mask, position_ids=pos, past_key_values=kv,
                                  use_cache=True, position_embeddings=rope)
    return h


def tree_forward(model, transfer: TransferLayers, kv: TreeKV, tokens: list[int],
                 parents: list[int], depths: list[int], pseudo_for: list[int],
                 k: int | None = None) -> TreeOut:
    """One forward of the model over nodes ``tokens`` that continue the cached prefix.

    Node j sits at position kv.length + depths[j] and attends to the prefix and its ancestors;
    the nodes in ``pseudo_for`` also get k pseudo tokens at layer L, at positions node + 1..k.
    Prefill is the chain case (parents j-1, depths j, pseudo for the last node only). ``k``
    (default: all of the layers' k) computes only the first k pseudo tokens: a tree that never
    goes deeper than k needs no more.
    """
    dev = next(model.parameters()).device
    n, L = len(tokens), transfer.layer
    k = transfer.k if k is None else k
    prefix = kv.length
    low, high = tree_masks(parents, prefix, pseudo_for, k)
    pos = torch.tensor([prefix + d for d in depths], device=dev)
    h = model.model.embed_tokens(torch.tensor([tokens], device=dev))  # [1, n, hidden]
    h = run_layers(model, h, pos, low, kv, range(L))
    pseudo = transfer(h[0, pseudo_for])[:, :k].reshape(1, -1, h.shape[-1])  # [1, g*k, hidden]
    offsets = torch.arange(1, k + 1, device=dev)
    ppos = (pos[pseudo_for][:, None] + offsets).reshape(-1)
    h = run_layers(model, torch.cat([h, pseudo], dim=1), torch.cat([pos, ppos]), high, kv,
                range(L, model.config.num_hidden_layers))
    h = model.model.norm(h[0])
    return TreeOut(h[:n], h[n:].reshape(len(pseudo_for), k, -1), pseudo_for)


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM head on final-norm hidden states h [..., hidden] -> float32 logits [..., vocab]."""
    return model.lm_head(h).float()


PACKAGED = Path(__file__).parent / "weights"  # trained files shipped with the code


def default_path(model: str) -> Path:
    """Where `pearl transfer train` saves layers for ``model``: next to the model cache."""
    from specdec.model_store import default_cache_dir

    return default_cache_dir() / "transfer" / f"{Path(model).name}.safetensors"


def find(model: str) -> Path | None:
    """The layers for ``model``: a freshly trained file first, else the one shipped here."""
    for path in (default_path(model), PACKAGED / f"{Path(model).name}.safetensors"):
        if path.is_file():
            return path
    return None
