"""The engine's KV store: preallocated pages shared by every live session of one model.

    k, v   per layer: [(pages + 1) * page_size, kv_heads, head_dim]   allocated once, at start-up
    Slots  one session's block table (page ids, in order) and how many tokens it has cached

A session's token at slot s lives in page ``pages[s // page_size]`` at offset ``s % page_size``:
row ``page * page_size + offset`` of each layer's K and V. One tensor per layer (not one for
all) so that a compiled step can write a layer's cache in place as a whole graph input
(specdec/static_step.py). The last page is never handed out: compiled steps write their padding
there and read it for padded rows.
Rolling back is a length change (``Slots.cached``); no per-step concatenation or copy of the
cache. When the store has no free page left, ``reserve`` raises ``StoreFull`` for that session
only: its neighbours' pages are never touched.
"""

from __future__ import annotations

import threading

import torch

PAGE_SIZE = 16


class StoreFull(RuntimeError):
    """The KV store cannot hold this session (answered with RESOURCE_EXHAUSTED)."""


class Slots:
    """One session's place in the store."""

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.cached = 0  # slots 0..cached-1 hold the K/V of the session's first tokens
        self._table: torch.Tensor | None = None  # self.pages as a tensor, rebuilt on change

    def table(self, device: torch.device) -> torch.Tensor:
        if self._table is None or len(self._table) != len(self.pages):
            self._table = torch.tensor(self.pages, dtype=torch.long, device=device)
        return self._table


class KVStore:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int,
                 dtype: torch.dtype, device: torch.device, page_size: int = PAGE_SIZE):
        self.page_size = page_size
        self.pages = max(1, -(-tokens // page_size))
        self.trash = self.pages  # the padding page (never in ``free``)
        shape = ((self.pages + 1) * page_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.device = device
        self.free = list(range(self.pages - 1, -1, -1))  # a stack: low page ids first
        self.lock = threading.Lock()
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * self.k[0].element_size()

    @property
    def tokens(self) -> int:
        return self.pages * self.page_size

    @property
    def free_tokens(self) -> int:
        return len(self.free) * self.page_size

    def reserve(self, slots: Slots, length: int) -> None:
        """Make room for ``length`` slots in ``slots`` (pages are only ever added)."""
        need = -(-length // self.page_size) - len(slots.pages)
        if need <= 0:
            return
        with self.lock:
            if need > len(self.free):
                raise StoreFull(
                    f"KV store full: a session needs {need * self.page_size} more token slots, "
                    f"{len(self.free) * self.page_size} of {self.tokens} are free "
                    "(--kv-cache-tokens); retry later")
            slots.pages.extend(self.free.pop() for _ in range(need))

    def release(self, slots: Slots) -> None:
        with self.lock:
            self.free.extend(reversed(slots.pages))
        slots.pages = []
        slots.cached = 0

    def rows(self, slots: Slots, s: torch.Tensor) -> torch.Tensor:
        """The rows of every layer's K and V that hold a session's slots ``s``."""
        return slots.table(self.device)[s // self.page_size] * self.page_size + s % self.page_size

    def row(self, slots: Slots, s: int) -> int:
        """``rows`` for one slot, as a Python int (the compiled step builds its inputs so)."""
        return slots.pages[s // self.page_size] * self.page_size + s % self.page_size

    def write(self, layer: int, slots: Slots, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, head_dim] into slots start..start+n-1 of one layer."""
        at = self.rows(slots, torch.arange(start, start + k.shape[0], device=self.device))
        self.k[layer][at], self.v[layer][at] = k, v

    def read(self, layer: int, slots: Slots, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, length, head_dim] of slots 0..length-1 of one layer."""
        at = self.rows(slots, torch.arange(length, device=self.device))
        return self.k[layer][at].transpose(0, 1), self.v[layer][at].transpose(0, 1)

    def move(self, slots: Slots, src: list[int], dst: int) -> None:
        """Copy slots ``src`` (every layer) to dst, dst+1, ... (Hidden Transfer's compaction)."""
        if src == list(range(dst, dst + len(src))):
            return
        s = self.rows(slots, torch.tensor(src, device=self.device))
        d = self.rows(slots, torch.arange(dst, dst + len(src), device=self.device))
        for cache in (*self.k, *self.v):
            cache[d] = cache[s]  # advanced indexing reads a copy first
