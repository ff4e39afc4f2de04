"""The engine's KV store: preallocated pages shared by every live session of one model.

    k, v       per layer: [(pages + 1) * page_size, kv_heads, head_dim]   allocated once
    BlockTable one session's pages (ids, in order) and how many tokens it has cached

A session's token at slot s lives in page ``pages[s // page_size]`` at offset ``s % page_size``:
row ``page * page_size + offset`` of each layer's K and V. One tensor per layer (not one for
all) so that a compiled step can write a layer's cache in place as a whole graph input
(specdec/static_step.py). The last page is never handed out: compiled steps write their padding
there and read it for padded feeds.
Rolling back is a length change (``BlockTable.cached``); no per-step concatenation or copy of
the cache. When the store has no page left, ``reserve`` raises ``StoreFull`` for that session
only: its neighbours' pages are never touched.

The prefix cache (vLLM's automatic prefix caching): a full page whose K/V are known is keyed by
a hash chain of the tokens that made it (sha256 of its parent page's key and its own token
ids), since a token's K/V depend only on the tokens up to it. A new session takes the longest
chain of cached pages its prompt starts with (``lookup``) and feeds only the rest. A cached page
is immutable and shared by reference count; a session that must write over one (a rollback
below it) gets a private copy first (``unshare``). Pages no session holds stay cached, least
recently used first in ``idle``, and are evicted only when a session needs room, so the cache
never refuses a session that would fit without it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

PAGE_SIZE = 16
ROOT = b""  # the parent key of a sequence's first page


class StoreFull(RuntimeError):
    """The KV store cannot hold this session (answered with RESOURCE_EXHAUSTED)."""


class BlockTable:
    """One session's place in the store."""

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.cached = 0  # slots 0..cached-1 hold the K/V of the session's first tokens
        self.keys: list[bytes] = []  # chain keys of its first full pages (computed once)
        self.promised: list[bytes] = []  # keys of pages its prefill fills for others to share
        self._table: torch.Tensor | None = None  # self.pages as a tensor, rebuilt on change

    def table(self, device: torch.device) -> torch.Tensor:
        if self._table is None:
            self._table = torch.tensor(self.pages, dtype=torch.long, device=device)
        return self._table

    def changed(self) -> None:
        self._table = None


class KVStore:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int,
                 dtype: torch.dtype, device: torch.device, page_size: int = PAGE_SIZE,
                 prefix_cache: bool = True):
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
        # the prefix cache
        self.prefix_cache = prefix_cache
        self.page_of: dict[bytes, int] = {}  # chain key -> cached page
        self.key_of: dict[int, bytes] = {}  # cached page -> its chain key
        self.refs: dict[int, int] = {}  # cached page -> sessions holding it
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached pages no session holds, LRU
        self.filling: dict[bytes, threading.Event] = {}  # keys a session's prefill will cache
        self.hit_tokens = 0  # prompt tokens found cached, since start
        self.lookup_tokens = 0  # prompt tokens looked up, since start

    @property
    def tokens(self) -> int:
        return self.pages * self.page_size

    @property
    def free_tokens(self) -> int:
        """Slots a session can have now: free pages and cached pages no session holds."""
        return (len(self.free) + len(self.idle)) * self.page_size

    @property
    def cached_tokens(self) -> int:
        """Slots of pages in the prefix cache (held by sessions or idle)."""
        return len(self.key_of) * self.page_size

    # -- pages -----------------------------------------------------------------------------

    def _take(self) -> int:
        """A free page, evicting the least recently used idle cached page if need be."""
        if not self.free:
            page, _ = self.idle.popitem(last=False)
            del self.page_of[self.key_of.pop(page)], self.refs[page]
            return page
        return self.free.pop()

    def reserve(self, slots: BlockTable, length: int) -> None:
        """Make room for ``length`` slots in ``slots`` (pages are only ever added)."""
        need = -(-length // self.page_size) - len(slots.pages)
        if need <= 0:
            return
        with self.lock:
            if need > len(self.free) + len(self.idle):
                raise StoreFull(
                    f"KV store full: a session needs {need * self.page_size} more token slots, "
                    f"{self.free_tokens} of {self.tokens} are free "
                    "(--kv-cache-tokens); retry later")
            slots.pages.extend(self._take() for _ in range(need))
        slots.changed()

    def release(self, slots: BlockTable, ids: list[int] | None = None) -> None:
        """Give a session's pages back; with its ``ids``, first cache its full pages."""
        with self.lock:
            if ids is not None:
                self._keep(slots, ids)
            self._abandon(slots)
            for page in reversed(slots.pages):  # the chain's tail becomes the first evicted
                if page in self.key_of:
                    self.refs[page] -= 1
                    if not self.refs[page]:
                        self.idle[page] = None
                else:
                    self.free.append(page)
            slots.pages, slots.keys, slots.cached = [], [], 0
        slots.changed()

    # -- the prefix cache --------------------------------------------------------------------

    def chain(self, slots: BlockTable, ids: list[int], n: int) -> list[bytes]:
        """The keys of the first ``n`` full pages of ``ids`` (extending ``slots.keys``)."""
        ps = self.page_size
        while len(slots.keys) < n:
            i = len(slots.keys)
            parent = slots.keys[-1] if slots.keys else ROOT
            block = ids[i * ps : (i + 1) * ps]
            slots.keys.append(hashlib.sha256(
                parent + b"".join(t.to_bytes(4, "little") for t in block)).digest())
        return slots.keys[:n]

    def lookup(self, slots: BlockTable, ids: list[int], wait: bool = True
               ) -> threading.Event | None:
        """Give an empty session the cached pages that ``ids`` start with, then promise the
        full pages of ``ids`` it will fill itself to the sessions that look them up meanwhile.
        With ``wait``, when another session's prefill is filling the next page, take nothing
        and return the event to wait for (then look up again)."""
        if not self.prefix_cache or slots.pages:
            return None
        with self.lock:
            keys = self.chain(slots, ids, len(ids) // self.page_size)
            hit = 0
            while hit < len(keys) and keys[hit] in self.page_of:
                hit += 1
            if wait and hit < len(keys) and keys[hit] in self.filling:
                return self.filling[keys[hit]]
            for key in keys[:hit]:
                page = self.page_of[key]
                self.refs[page] += 1
                self.idle.pop(page, None)
                slots.pages.append(page)
            slots.promised = [k for k in keys[hit:] if k not in self.filling]
            for key in slots.promised:
                self.filling[key] = threading.Event()
            slots.cached = hit * self.page_size
            self.hit_tokens += slots.cached
            self.lookup_tokens += len(ids)
        slots.changed()
        return None

    def keep(self, slots: BlockTable, ids: list[int]) -> None:
        """Cache the session's full pages of known K/V (``ids[:cached]``) and wake the sessions
        waiting for them. A page whose tokens another page already caches stays private."""
        with self.lock:
            self._keep(slots, ids)

    def _keep(self, slots: BlockTable, ids: list[int]) -> None:
        if not self.prefix_cache:
            return
        full = min(slots.cached, len(ids), len(slots.pages) * self.page_size) // self.page_size
        for key, page in zip(self.chain(slots, ids, full), slots.pages):
            if page not in self.key_of and key not in self.page_of:
                self.page_of[key], self.key_of[page], self.refs[page] = page, key, 1
        kept = [k for k in slots.promised if k in self.page_of]
        self._wake(kept)
        slots.promised = [k for k in slots.promised if k not in self.page_of]

    def abandon(self, slots: BlockTable) -> None:
        """Wake the sessions waiting for pages this session promised but will not fill."""
        with self.lock:
            self._abandon(slots)

    def _abandon(self, slots: BlockTable) -> None:
        self._wake(slots.promised)
        slots.promised = []

    def _wake(self, keys: list[bytes]) -> None:
        for key in keys:
            event = self.filling.pop(key, None)
            if event is not None:
                event.set()

    def unshare(self, slots: BlockTable, n: int) -> None:
        """Slots n.. will be written again (a rollback to n): the cached pages they lie in
        become private (the page holding slot n a copy, for its slots before n)."""
        first = n // self.page_size
        with self.lock:
            del slots.keys[first:]
            if not self.key_of or not any(p in self.key_of for p in slots.pages[first:]):
                return
            for i in range(first, len(slots.pages)):
                page = slots.pages[i]
                if page not in self.key_of:
                    continue
                if not (self.free or self.idle):
                    raise StoreFull("KV store full: no page left to roll a session back into")
                new = self._take()
                if i == first and n % self.page_size:
                    self._copy(page, new)
                self.refs[page] -= 1
                if not self.refs[page]:
                    self.idle[page] = None
                slots.pages[i] = new
        slots.changed()

    def _copy(self, src: int, dst: int) -> None:
        ps = self.page_size
        for cache in (*self.k, *self.v):
            cache[dst * ps : (dst + 1) * ps] = cache[src * ps : (src + 1) * ps]

    # -- rows --------------------------------------------------------------------------------

    def rows(self, slots: BlockTable, s: torch.Tensor) -> torch.Tensor:
        """The rows of every layer's K and V that hold a session's slots ``s``."""
        return slots.table(self.device)[s // self.page_size] * self.page_size + s % self.page_size

    def row(self, slots: BlockTable, s: int) -> int:
        """``rows`` for one slot, as a Python int (the compiled step builds its inputs so)."""
        return slots.pages[s // self.page_size] * self.page_size + s % self.page_size

    def write(self, layer: int, slots: BlockTable, start: int, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """k, v [n, kv_heads, head_dim] into slots start..start+n-1 of one layer."""
        at = self.rows(slots, torch.arange(start, start + k.shape[0], device=self.device))
        self.k[layer][at], self.v[layer][at] = k, v

    def read(self, layer: int, slots: BlockTable, length: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, length, head_dim] of slots 0..length-1 of one layer."""
        at = self.rows(slots, torch.arange(length, device=self.device))
        return self.k[layer][at].transpose(0, 1), self.v[layer][at].transpose(0, 1)

    def move(self, slots: BlockTable, src: list[int], dst: int) -> None:
        """Copy slots ``src`` (every layer) to dst, dst+1, ... (Hidden Transfer's compaction)."""
        if src == list(range(dst, dst + len(src))):
            return
        s = self.rows(slots, torch.tensor(src, device=self.device))
        d = self.rows(slots, torch.arange(dst, dst + len(src), device=self.device))
        for cache in (*self.k, *self.v):
            cache[d] = cache[s]  # advanced indexing reads a copy first
