"""A remote latency target: a small HTTP server that times ONNX models in ONNX Runtime on the device it runs on.

Run it on the device the model will ship to (a board, an edge server): it needs Python, ``numpy`` and
``onnxruntime``, not torch (``pip install --no-deps ranksearch`` beside them is enough). Then a search on another
machine passes ``--target http://HOST:PORT`` with the server's token in ``$RANKSEARCH_TARGET_TOKEN``.

The protocol (every request carries ``Authorization: Bearer TOKEN``; answers are JSON, errors ``{"error": ...}``):

- ``GET /info``: the server's runtime, threads, machine and upload limit.
- ``PUT /models/SHA256``: an ONNX model, stored under its SHA-256 once ONNX Runtime has loaded it (201); refused
  when the digest differs (400), the body exceeds the upload limit (413) or ONNX Runtime cannot load it (422).
- ``POST /time``: ``{"reference": SHA, "candidate": SHA, "input": {...}, "rounds", "target_seconds", "threads"}``:
  the two models timed in alternating rounds on the input, as a search times them locally
  (:func:`ranksearch.measure.ort.paired_sessions`); models the server does not hold (it was restarted) are listed
  in a 404's ``missing``, to be uploaded again.
- ``POST /latency``: ``{"model": SHA, "input": {...}, "threads", "timing": {...}}``: one model's latency
  (:func:`ranksearch.measure.timing.time_repeatedly`), for per-layer tables.

One model is timed at a time (a lock): requests from several workers queue rather than disturb each other.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import platform
import re
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ranksearch.errors import RanksearchError
from ranksearch.measure.ort import ort_session, paired_sessions, session_timer
from ranksearch.util import first_line

PROTOCOL = 1
"""Bumped when requests or answers change incompatibly; the client refuses a server of another protocol."""
TOKEN_ENV = "RANKSEARCH_TARGET_TOKEN"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_STORE_MB = 2048
INPUT_DTYPES = ("float32",)
TIMING_KEYS = ("warmup", "min_runs", "max_runs", "target_seconds", "max_spread", "max_attempts")
MAX_ROUNDS = 64
MAX_TARGET_SECONDS = 60.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a one-line reason (sent as ``{"error": reason}``)."""

    def __init__(self, status: HTTPStatus, reason: str, **details: object) -> None:
        super().__init__(reason)
        self.status = status
        self.details = details


@dataclass
class ModelStore:
    """Uploaded ONNX models by SHA-256, in memory, the least recently used evicted beyond ``max_bytes``."""

    max_bytes: int
    models: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    def add(self, sha: str, data: bytes) -> None:
        self.models[sha] = data
        self.models.move_to_end(sha)
        while sum(len(m) for m in self.models.values()) > self.max_bytes and len(self.models) > 1:
            self.models.popitem(last=False)

    def get(self, sha: str) -> bytes | None:
        data = self.models.get(sha)
        if data is not None:
            self.models.move_to_end(sha)
        return data


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What ``ranksearch target serve`` takes."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    token: str
    threads: int | None = None
    """ONNX Runtime intra-op threads when a request does not say (None: every core of the device)."""
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    store_mb: float = DEFAULT_STORE_MB
    request_timeout_s: float = 60.0
    """How long a connection may take to send its request before it is dropped."""

    def validate(self) -> None:
        """One-line errors for values that cannot work."""
        if self.threads is not None and self.threads <= 0:
            raise RanksearchError(f"--threads {self.threads}: must be positive; pass e.g. 4 or leave it out")
        if not self.max_upload_mb > 0:
            raise RanksearchError(f"--max-upload-mb {self.max_upload_mb}: must be positive; pass e.g. 512")
        if not 0 < self.port < 65536:
            raise RanksearchError(f"--port {self.port}: not a port; pass one from 1 to 65535, e.g. {DEFAULT_PORT}")


class TargetServer(ThreadingHTTPServer):
    """The HTTP server and its state: the options, the stored models, the timing lock."""

    daemon_threads = True

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.store = ModelStore(max_bytes=int(options.store_mb * 2**20))
        self.timing_lock = threading.Lock()
        super().__init__((options.host, options.port), _Handler)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.options.max_upload_mb * 2**20)

    def default_threads(self) -> int:
        return self.options.threads or os.cpu_count() or 1

    def info(self) -> dict[str, object]:
        import onnxruntime

        return {
            "server": "ranksearch-target",
            "protocol": PROTOCOL,
            "runtime": f"onnxruntime {onnxruntime.__version__}",
            "threads": self.default_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}",
            "node": platform.node(),
            "python": platform.python_version(),
            "max_upload_bytes": self.max_upload_bytes,
        }

    def upload(self, sha: str, data: bytes) -> dict[str, object]:
        if hashlib.sha256(data).hexdigest() != sha:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the upload's SHA-256 is not {sha}: it was cut or altered")
        with self.timing_lock:  # loading a model takes the CPU the timing of another would use
            try:
                ort_session(data, threads=1)
            except RanksearchError as exc:
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
            self.store.add(sha, data)
        return {"sha256": sha, "bytes": len(data)}

    def time_pair(self, request: dict[str, Any]) -> dict[str, object]:
        shas = [_sha(request, "reference"), _sha(request, "candidate")]
        example = _input(request)
        threads = _threads(request, self.default_threads())
        rounds = _number(request, "rounds", int, 1, MAX_ROUNDS)
        target_seconds = _number(request, "target_seconds", float, 0.0, MAX_TARGET_SECONDS)
        with self.timing_lock:
            missing = [sha for sha in dict.fromkeys(shas) if self.store.get(sha) is None]
            if missing:
                reason = f"{len(missing)} of the models are not held here"
                raise RequestError(HTTPStatus.NOT_FOUND, reason, missing=missing)
            sessions = [self._session(role, sha, threads) for role, sha in zip(("reference", "candidate"), shas)]
            try:
                paired = paired_sessions(
                    *sessions, example, threads=threads, rounds=rounds, target_seconds=target_seconds
                )
            except Exception as exc:  # ONNX Runtime raises errors of many types on a model it cannot run
                reason = f"the models cannot run: {first_line(exc)}"
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, reason) from None
        return paired.to_dict()

    def time_one(self, request: dict[str, Any]) -> dict[str, object]:
        sha = _sha(request, "model")
        example = _input(request)
        threads = _threads(request, self.default_threads())
        timing = request.get("timing", {})
        if not isinstance(timing, dict) or set(timing) - set(TIMING_KEYS):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"timing: an object with keys among {', '.join(TIMING_KEYS)}")
        with self.timing_lock:
            session = self._session("model", sha, threads)
            try:
                latency = session_timer(session, example, threads=threads)(**timing)
            except Exception as exc:  # as in time_pair
                reason = f"the model cannot run: {first_line(exc)}"
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, reason) from None
        return latency.to_dict()

    def _session(self, role: str, sha: str, threads: int) -> Any:
        data = self.store.get(sha)
        if data is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"{role} model {sha[:12]} is not held here", missing=[sha])
        try:
            return ort_session(data, threads=threads)
        except RanksearchError as exc:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None


class _Handler(BaseHTTPRequestHandler):
    server: TargetServer
    server_version = "ranksearch-target"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.options.request_timeout_s
        super().setup()

    def do_GET(self) -> None:
        self._answer(lambda: self.server.info() if self.path == "/info" else _not_found(self.path))

    def do_PUT(self) -> None:
        match = re.fullmatch(r"/models/([0-9a-f]{64})", self.path)
        self._answer(lambda: self.server.upload(match.group(1), self._body()) if match else _not_found(self.path))

    def do_POST(self) -> None:
        routes = {"/time": self.server.time_pair, "/latency": self.server.time_one}
        route = routes.get(self.path)
        self._answer(lambda: route(self._json()) if route else _not_found(self.path))

    def _answer(self, work: Any) -> None:
        try:
            self._authorize()
            status, document = HTTPStatus.OK, work()
            if self.command == "PUT":
                status = HTTPStatus.CREATED
        except RequestError as exc:
            status, document = exc.status, {"error": str(exc), **exc.details}
            self.close_connection = True  # a refused request's body may be unread
        except TimeoutError:
            return  # the client stopped sending; nothing to answer
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _authorize(self) -> None:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.options.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            reason = "no token was sent" if not given else "the token was refused"
            raise RequestError(HTTPStatus.UNAUTHORIZED, reason)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body's Content-Length")
        size = int(length)
        if size > self.server.max_upload_bytes:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{size} bytes exceed the upload limit of {self.server.max_upload_bytes} bytes (--max-upload-mb)",
            )
        data = self.rfile.read(size)
        if len(data) != size:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(data)} of {size} bytes")
        return data

    def _json(self) -> dict[str, Any]:
        try:
            document = json.loads(self._body())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({first_line(exc)})") from None
        if not isinstance(document, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a JSON object")
        return document


def _not_found(path: str) -> dict[str, object]:
    raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}")


def _sha(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}: a model's SHA-256 in hex is required")
    return value


def _number(request: dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}: a number from {low} to {high} is required")
    return kind(value)


def _threads(request: dict[str, Any], default: int) -> int:
    if request.get("threads") is None:
        return default
    return _number(request, "threads", int, 1, 1024)


def _input(request: dict[str, Any]) -> Any:
    """The request's example input as a numpy array: ``{"shape": [...], "dtype": "float32", "data": base64}``."""
    import numpy

    spec = request.get("input")
    if not isinstance(spec, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "input: an object with shape, dtype and base64 data is required")
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape) or dtype not in INPUT_DTYPES:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"input: a shape of positive sizes and dtype in {INPUT_DTYPES}")
    try:
        data = base64.b64decode(str(spec.get("data", "")), validate=True)
        return numpy.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"input: data does not fit its shape ({first_line(exc)})") from None


def serve(options: ServerOptions, *, generated_token: bool = False, announce: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C ends it quietly); once the port is bound, ``announce`` gets where it listens,
    how a search uses it and, when ``generated_token``, the token. Missing packages and a port that cannot be bound
    are one-line :class:`RanksearchError` s."""
    options.validate()
    try:
        import numpy  # noqa: F401 (checked before a client is told the server is ready)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RanksearchError(f"{exc.name} is not installed here; pip install onnxruntime numpy") from None
    try:
        server = TargetServer(options)
    except OSError as exc:
        raise RanksearchError(
            f"cannot listen on {options.host}:{options.port} ({exc.strerror}); pass another --port or --host"
        ) from None
    try:
        announce(announcement(server, generated_token))
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def resolve_token(token: str | None) -> tuple[str, bool]:
    """The token given, else ``$RANKSEARCH_TARGET_TOKEN``, else a new random one; and whether it was generated."""
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def main(argv: Sequence[str] | None = None) -> int:
    """``ranksearch-target``: the server without the rest of ranksearch (no torch needed)."""
    parser = argparse.ArgumentParser(prog="ranksearch-target", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token", help=f"the token clients must send (default: ${TOKEN_ENV}, else a new one)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: every core)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    args = parser.parse_args(argv)
    token, generated = resolve_token(args.token)
    options = ServerOptions(
        host=args.host, port=args.port, token=token, threads=args.threads, max_upload_mb=args.max_upload_mb
    )
    try:
        serve(options, generated_token=generated, announce=lambda text: print(text, flush=True))
    except RanksearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def announcement(server: TargetServer, generated: bool) -> str:
    """What the server prints once it listens: where, and how a search uses it."""
    host, port = server.server_address[:2]
    shown = "HOST" if host in ("0.0.0.0", "::") else host
    lines = [f"ranksearch target: {server.info()['runtime']}, {server.default_threads()} threads, on {host}:{port}"]
    if generated:
        lines.append(f"token (generated): {server.options.token}")
    lines.append(f"search with: {TOKEN_ENV}=<token> ranksearch run ... --target http://{shown}:{port}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
