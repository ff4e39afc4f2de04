"""The transfer layers: k low-rank maps at layer L, their weights file, and where it is found.

A file holds the maps plus what was measured when they were trained (the rank acceptance the tree
is chosen from); `pearl transfer train` (pearl/transfer_train.py) writes one next to the model
cache, and a trained file for the default target ships in weights/ here.
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
    # rank-r draft candidate; the tree is chosen from it (tree.tree_paths)
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
