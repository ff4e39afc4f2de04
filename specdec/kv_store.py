"""The engine's KV store: preallocated pages shared by every live session of one model.

    k, v   [layers, pages, kv_heads, page_size, head_dim]   allocated once, at start-up
    Slots  one session's block table (page ids, in order) and how many tokens it has cached

A session's token at slot s lives in page ``pages[s // page_size]`` at offset ``s % page_size``.
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
        shape = (layers, self.pages, kv_heads, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = device
        self.free = list(range(self.pages - 1, -1, -1))  # a stack: low page ids first
        self.lock = threading.Lock()
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * self.k.element_size()

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

    def write(self, layer: int, slots: Slots, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, head_dim] into slots start..start+n-1 of one layer."""
        s = torch.arange(start, start + k.shape[0], device=self.device)
        page = slots.table(self.device)[s // self.page_size]
        off = s % self.page_size
        self.k[layer, page, :, off] = k
        self.v[layer, page, :, off] = v

    def read(self, layer: int, slots: Slots, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, length, head_dim] of slots 0..length-1 of one layer."""
        n = -(-length // self.page_size)
        table = slots.table(self.device)[:n]
        kvh, hd = self.k.shape[2], self.k.shape[4]
        k = self.k[layer, table].transpose(0, 1).reshape(kvh, n * self.page_size, hd)
        v = self.v[layer, table].transpose(0, 1).reshape(kvh, n * self.page_size, hd)
        return k[:, :length], v[:, :length]

    def move(self, slots: Slots, src: list[int], dst: int) -> None:
        """Copy slots ``src`` (every layer) to dst, dst+1, ... (Hidden Transfer's compaction)."""
        if src == list(range(dst, dst + len(src))):
            return
        table = slots.table(self.device)
        s = torch.tensor(src, device=self.device)
        d = torch.arange(dst, dst + len(src), device=self.device)
        sp, so = table[s // self.page_size], s % self.page_size
        dp, do = table[d // self.page_size], d % self.page_size
        for cache in (self.k, self.v):
            cache[:, dp, :, do] = cache[:, sp, :, so].clone()
