"""Small helpers every layer shares: atomic writes, JSON caches, loading user objects, one-line error text."""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from ranksearch.errors import RanksearchError

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""Errors of a write that found no room: the disk is full, a quota or the file size limit is reached."""

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A handle on a temporary file beside ``path`` that replaces ``path`` only if the block succeeds.

    A full disk (or file size limit) is a :class:`RanksearchError` naming ``path``; ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise RanksearchError(
                f"{path}: cannot be written ({exc.strerror}); free disk space or write to another disk"
            ) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_open(path) as handle:
        handle.write(text)


def read_json_cache(path: Path | None) -> Any:
    """The JSON document cached at ``path`` (marked used), or None when there is none or it is unreadable (it is
    rebuilt)."""
    if path is None or not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    mark_used(path)
    return document


def write_json_cache(path: Path, document: Any) -> None:
    """Write a cache document atomically (sorted keys, so equal caches are equal files)."""
    atomic_write_text(path, json.dumps(document, sort_keys=True))


def require_modules(modules: tuple[str, ...], *, extra: str, what: str) -> None:
    """A one-line error when any of ``modules`` is not installed: ``what`` needs them, the ``extra`` installs them."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise RanksearchError(
            f"{what} needs {' and '.join(missing)}, not installed; install the extra: pip install 'ranksearch[{extra}]'"
        )


def first_line(exc: BaseException) -> str:
    """The exception's message, first line only (its type name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: message``, first line only."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def file_digest(path: Path) -> str:
    """A short digest of a file's bytes."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def digest(document: Any) -> str:
    """A short digest of a JSON-able document (keys sorted)."""
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def package_version() -> str:
    """This installed release's version (``0+unknown`` when run from a source tree that was never installed)."""
    try:
        return metadata.version("ranksearch")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def cache_dir() -> Path:
    """Where trained baselines and factors are cached: ``$RANKSEARCH_CACHE_DIR`` or ``~/.cache/ranksearch``."""
    return Path(os.environ.get("RANKSEARCH_CACHE_DIR") or Path.home() / ".cache" / "ranksearch")


CACHE_LIMIT_GB = 4.0
"""The factor cache's default size limit on disk (``$RANKSEARCH_CACHE_MAX_GB`` overrides it)."""


def cache_limit_bytes() -> int:
    """The factor cache's size limit: ``$RANKSEARCH_CACHE_MAX_GB`` gigabytes, else :data:`CACHE_LIMIT_GB`."""
    raw = os.environ.get("RANKSEARCH_CACHE_MAX_GB")
    try:
        gigabytes = CACHE_LIMIT_GB if raw is None else float(raw)
    except ValueError:
        gigabytes = -1.0
    if not (math.isfinite(gigabytes) and gigabytes >= 0):
        raise RanksearchError(f"RANKSEARCH_CACHE_MAX_GB={raw!r}: not a size in GB; set e.g. RANKSEARCH_CACHE_MAX_GB=4")
    return int(gigabytes * 1e9)


CGROUP_MEMORY_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
"""Where Linux gives a process's control-group memory limit: cgroup v2, then v1."""


def memory_limit_bytes(*, cgroup_files: tuple[Path, ...] = CGROUP_MEMORY_FILES) -> int | None:
    """The memory this process may use: the machine's, or its control group's limit where lower (the first of
    ``cgroup_files`` that exists; "max" or no file: no limit); None where neither can be read."""
    limits = []
    for path in cgroup_files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
        break
    with suppress(AttributeError, OSError, ValueError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    known = [limit for limit in limits if limit > 0]
    return min(known) if known else None


@dataclass(frozen=True)
class CachedFile:
    """A file of a cache directory: its size and when it was last used (its modification time)."""

    path: Path
    size: int
    used: float


def cached_files(directory: Path, pattern: str = "*") -> list[CachedFile]:
    """The files of ``directory`` matching ``pattern``, least recently used first (temporary files left out;
    files that vanish meanwhile, removed by another process, are skipped)."""
    found = []
    for path in directory.glob(pattern) if directory.is_dir() else ():
        if path.name.startswith("."):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            found.append(CachedFile(path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda f: f.used)


def mark_used(path: Path) -> None:
    """Record that ``path`` was just used (its modification time), so least-recently-used eviction spares it."""
    with suppress(OSError):
        os.utime(path)


STALE_TEMPORARY_S = 3600.0
"""A temporary file (``.name.*.tmp``, an atomic write in progress) untouched this long was left by a killed writer."""


def remove_stale_temporaries(directory: Path) -> int:
    """Remove the temporary files that killed writers left in ``directory``; return the bytes freed."""
    freed = 0
    cutoff = time.time() - STALE_TEMPORARY_S
    for path in directory.glob(".*.tmp") if directory.is_dir() else ():
        with suppress(OSError):
            stat = path.stat()
            if stat.st_mtime < cutoff:
                path.unlink()
                freed += stat.st_size
    return freed


def evict_least_recent(directory: Path, *, max_bytes: int, pattern: str = "*", target: float = 0.8) -> int:
    """When ``directory``'s files exceed ``max_bytes``, remove the least recently used down to ``target`` of it;
    return the bytes freed. Safe beside other processes: a reader holding a removed file still reads it, and one
    that finds it gone recomputes it."""
    files = cached_files(directory, pattern)
    total = sum(f.size for f in files)
    if total <= max_bytes:
        return 0
    freed = 0
    for file in files:
        if total - freed <= target * max_bytes:
            break
        with suppress(FileNotFoundError):
            file.path.unlink()
            freed += file.size
    return freed


def sqlite_url(database: Path) -> str:
    """The SQLAlchemy URL of a SQLite database file."""
    return f"sqlite:///{database.resolve()}"


GRPC_SCHEME = "grpc://"
"""A storage URL of this scheme names a storage server (``ranksearch serve-storage``): ``grpc://HOST:PORT``."""
GRPC_CONNECT_TIMEOUT_S = 10.0


def grpc_address(url: str) -> tuple[str, int]:
    """HOST and PORT of ``grpc://HOST:PORT`` (a malformed one is a one-line error)."""
    host, _, port = url.removeprefix(GRPC_SCHEME).rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RanksearchError(f"--storage {url}: not a storage server address; pass grpc://HOST:PORT")
    return host, int(port)  # an IPv6 address keeps its brackets: grpc's target is "[::1]:13000"


def grpc_storage(url: str) -> Any:
    """An Optuna ``GrpcStorageProxy`` for ``grpc://HOST:PORT``, once its server answers (one-line errors when grpcio
    is missing or no server answers within :data:`GRPC_CONNECT_TIMEOUT_S`)."""
    import warnings

    import optuna

    host, port = grpc_address(url)
    try:
        import grpc  # noqa: F401  (optuna imports it lazily: fail here, with the fix)
    except ImportError:
        raise RanksearchError(
            f"--storage {url}: the storage server client needs grpcio; pip install 'ranksearch[grpc]'"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=GRPC_CONNECT_TIMEOUT_S)
    except ConnectionError:
        raise RanksearchError(
            f"--storage {url}: no storage server answered in {GRPC_CONNECT_TIMEOUT_S:g} s; start "
            f"`ranksearch serve-storage --storage DATABASE_URL --port {port}` on {host}, or check the address"
        ) from None
    return proxy


def storage_for(url: str) -> Any:
    """What ``optuna`` takes as ``storage=``: the URL itself, or for ``grpc://HOST:PORT`` a connected proxy."""
    return grpc_storage(url) if url.startswith(GRPC_SCHEME) else url


def import_module_from(target: str) -> Any:
    """Import ``package.module`` or a ``path/file.py`` (registered in ``sys.modules`` under a private name).

    Raises what the import raises (user code): callers turn it into a one-line error.
    """
    if target.endswith(".py") or "/" in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist")
        name = f"ranksearch_user_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"{file} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(target)


def import_object(spec: str, option: str) -> Any:
    """The object ``spec`` names (``package.module:Name`` or ``path/file.py:Name``); a one-line error otherwise."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RanksearchError(f"{option} {spec!r}: no ':Name'; pass 'package.module:Name' or 'path/file.py:Name'")
    try:
        return getattr(import_module_from(module_name), attr)
    except Exception as exc:  # the module is user code: whatever its import raises is reported, not raised
        raise RanksearchError(
            f"{option} {spec!r}: cannot be loaded ({describe(exc)}); check that the module imports "
            "(on PYTHONPATH, or a path ending in .py) and defines the name"
        ) from None
