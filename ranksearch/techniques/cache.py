"""Decompositions computed once per layer: an in-memory LRU backed by an on-disk store.

Keys hold a digest of the layer's weights (and of calibration inputs for data-aware
factorizations), so a changed weight never hits a stale entry. Disk entries are written to a
temporary file and renamed, so a kill never leaves a half-written entry behind. The disk store is
bounded (``$RANKSEARCH_CACHE_MAX_GB``, default 4 GB): past it, the least recently used entries go.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ranksearch.errors import RanksearchError
from ranksearch.util import (
    atomic_open,
    cache_limit_bytes,
    cached_files,
    evict_least_recent,
    mark_used,
    remove_stale_temporaries,
)

Factors = dict[str, torch.Tensor]

_DIGESTS = WeakIdKeyDictionary()  # tensor -> (version, digest), by identity


def tensor_digest(tensor: torch.Tensor) -> str:
    """A content hash of ``tensor`` (memoized while the tensor is unchanged)."""
    version = tensor._version
    hit = _DIGESTS.get(tensor)
    if hit is not None and hit[0] == version:
        return hit[1]
    data = tensor.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}{data.dtype}".encode())
    h.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    _DIGESTS[tensor] = (version, digest)
    return digest


def default_cache_dir() -> Path:
    """``$RANKSEARCH_CACHE_DIR`` or ``~/.cache/ranksearch``; factors live under ``factors/``."""
    root = os.environ.get("RANKSEARCH_CACHE_DIR") or Path.home() / ".cache" / "ranksearch"
    return Path(root) / "factors"


class FactorStore:
    """Memory LRU (bounded in bytes) over a directory of ``torch.save`` files.

    Only factorizations that took longer than ``persist_after_s`` to compute are written to
    disk; cheaper ones are faster to recompute than to load. The directory holds at most
    ``disk_max_bytes`` (None: no bound): a write that takes it past the bound removes the least
    recently used entries down to 80 % of it. Loading an entry marks it used, and so does a memory
    hit every :attr:`MARK_USED_EVERY_S`. The directory is counted again once this process has
    written a tenth of the bound since it last counted, so workers sharing it overshoot the bound
    by at most a tenth each.
    """

    MARK_USED_EVERY_S = 300.0
    RECOUNT_SHARE = 0.1

    def __init__(
        self,
        *,
        directory: Path | None = None,
        max_bytes: int = 4 << 30,
        disk_max_bytes: int | None = None,
        persist_after_s: float = 0.02,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.disk_max_bytes = disk_max_bytes
        self._disk_bytes: int | None = None  # the directory's size as this process last counted it, plus its writes
        self._written_since_count = 0
        self._marked: dict[str, float] = {}  # key -> when its disk entry was last marked used
        self.persist_after_s = persist_after_s
        self._memory: OrderedDict[str, Factors] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.disk_hits = self.misses = 0

    def get(self, key: str, compute: Callable[[], Factors]) -> Factors:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits += 1
                path = self._path(key)
                if path is not None and time.monotonic() - self._marked.get(key, 0.0) > self.MARK_USED_EVERY_S:
                    self._marked[key] = time.monotonic()
                    mark_used(path)  # a hot entry is not the first evicted from disk
                return self._memory[key]
        factors = self._load(key)
        if factors is not None:
            self.disk_hits += 1
        else:
            self.misses += 1
            start = time.perf_counter()
            factors = {name: t.detach() for name, t in compute().items()}
            if time.perf_counter() - start >= self.persist_after_s:
                self._save(key, factors)
        self._remember(key, factors)
        return factors

    def clear(self) -> None:
        """Forget the in-memory entries (disk entries stay)."""
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    def _remember(self, key: str, factors: Factors) -> None:
        size = sum(t.numel() * t.element_size() for t in factors.values())
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = factors
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in old.values())

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.pt"

    def _load(self, key: str) -> Factors | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            factors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt entry (or one evicted meanwhile) is recomputed and written again
            return None
        mark_used(path)
        self._marked[key] = time.monotonic()
        return factors

    def _save(self, key: str, factors: Factors) -> None:
        path = self._path(key)
        if path is None:
            return
        with contextlib.suppress(OSError, RanksearchError), atomic_open(path, "wb") as handle:  # costs only speed
            torch.save({k: v.cpu() for k, v in factors.items()}, handle)
        self._bound_disk(path)

    def _bound_disk(self, written: Path) -> None:
        """Count ``written`` towards the directory's size; past :attr:`disk_max_bytes`, evict and count again."""
        if self.disk_max_bytes is None or self.directory is None:
            return
        with contextlib.suppress(OSError):
            size = written.stat().st_size
            with self._lock:
                self._written_since_count += size
                if self._disk_bytes is None or self._written_since_count > self.RECOUNT_SHARE * self.disk_max_bytes:
                    self._count_disk()
                else:
                    self._disk_bytes += size
                if self._disk_bytes <= self.disk_max_bytes:
                    return
                remove_stale_temporaries(self.directory)
                evict_least_recent(self.directory, max_bytes=self.disk_max_bytes, pattern="*.pt")
                self._count_disk()

    def _count_disk(self) -> None:
        assert self.directory is not None
        self._disk_bytes = sum(f.size for f in cached_files(self.directory, "*.pt"))
        self._written_since_count = 0


_default_store: FactorStore | None = None


def default_store() -> FactorStore:
    """The process-wide store, on disk under :func:`default_cache_dir`."""
    global _default_store
    if _default_store is None:
        _default_store = FactorStore(directory=default_cache_dir(), disk_max_bytes=cache_limit_bytes())
    return _default_store


def set_default_store(store: FactorStore) -> None:
    """Replace the process-wide store (e.g. to move the cache or turn the disk off)."""
    global _default_store
    _default_store = store


@dataclass(frozen=True)
class FactorCache:
    """The view of a store that one layer's decomposition sees: keys are prefixed by the layer."""

    store: FactorStore
    prefix: str
    device: torch.device

    def __call__(self, tag: str, compute: Callable[[], Factors]) -> Factors:
        factors = self.store.get(f"{self.prefix}-{tag}", compute)
        return {k: v.to(self.device) for k, v in factors.items()}
