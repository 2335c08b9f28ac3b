"""A throwaway PostgreSQL cluster on loopback, for the distributed tests and the throughput benchmark."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

USER = "ranksearch"
DATABASE = "ranksearch"


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server's binaries (``apt-get install postgresql``), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).parent


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a cluster in a temporary directory (trust auth, 127.0.0.1 and a socket in that directory only),
    yield its SQLAlchemy URL, then stop it and delete everything. As root, the server runs as ``postgres``
    (initdb refuses root)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found; apt-get install postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="ranksearch-pg-"))
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    options = f"-k {root} -h 127.0.0.1 -p {port} -c fsync=off -c full_page_writes=off"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], cwd=root, check=True, capture_output=True, text=True)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start")
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
