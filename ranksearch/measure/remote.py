"""The client of a remote latency target (:mod:`ranksearch.measure.target_server`): models travel as ONNX.

A model is uploaded once, under its SHA-256; a server that was restarted says which models it lacks and they are
uploaded again. A server that does not answer (restarting) is retried for ``reconnect_s``; after that, or on a model
the device cannot run, the trial fails with the reason and the search goes on. A refused token stops the search:
every later trial would be refused too.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ranksearch.errors import RanksearchError, TrialFailure
from ranksearch.measure.target_server import PROTOCOL, TOKEN_ENV
from ranksearch.measure.timing import Latency, PairedLatency
from ranksearch.util import first_line

REQUEST_TIMEOUT_S = 300.0
"""The longest a timing request may take to answer (it queues behind other workers' requests on the server)."""
RECONNECT_S = 60.0
"""How long a target that refuses connections (restarting) is retried before the trial fails."""
RESENDS = 4
"""How many times a request is sent again after uploading the models the target lacked (each restart loses them)."""


class _Unreachable(Exception):
    """The target did not answer: connection refused or reset (retried), or timed out (not retried)."""

    def __init__(self, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


@dataclass(kw_only=True)
class RemoteTarget:
    """A target server at ``url`` (``http://HOST:PORT``) and the token it expects."""

    url: str
    token: str | None
    timeout_s: float = REQUEST_TIMEOUT_S
    reconnect_s: float = RECONNECT_S
    _described: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_url(cls, url: str, *, option: str = "--target", **limits: float) -> RemoteTarget:
        """The target at ``url``, the token from ``$RANKSEARCH_TARGET_TOKEN``; a malformed address is a one-line
        error naming ``option``."""
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None or parsed.path.strip("/"):
            raise RanksearchError(
                f"{option} {url!r}: not a target address; pass http://HOST:PORT, e.g. http://192.168.1.20:8765"
            )
        return cls(url=f"{parsed.scheme}://{parsed.netloc}", token=os.environ.get(TOKEN_ENV) or None, **limits)

    def info(self) -> dict[str, Any]:
        """The server's description (runtime, threads, machine); any failure is a one-line :class:`RanksearchError`
        (checked before a search starts)."""
        try:
            document = self._request("GET", "/info")
        except _Unreachable as exc:
            raise RanksearchError(
                f"--target {self.url}: no answer ({exc}); start `ranksearch target serve` on the device, or check "
                "the address and port"
            ) from None
        except TrialFailure as exc:
            raise RanksearchError(str(exc)) from None
        if document.get("server") != "ranksearch-target" or document.get("protocol") != PROTOCOL:
            raise RanksearchError(
                f"--target {self.url}: not a ranksearch target of protocol {PROTOCOL} (it says "
                f"{document.get('server')!r}, protocol {document.get('protocol')!r}); install the same ranksearch "
                "release on the device"
            )
        self._described = document
        return document

    def described(self) -> dict[str, Any]:
        """The server's description as :meth:`info` last read it (read now if never)."""
        return self._described if self._described is not None else self.info()

    def speedup(
        self,
        reference: bytes,
        candidate: bytes,
        example: Any,
        *,
        threads: int | None,
        rounds: int,
        target_seconds: float,
    ) -> PairedLatency:
        """``reference`` and ``candidate`` (ONNX) timed on the device in alternating rounds on ``example`` (a float32
        numpy array), as :func:`ranksearch.measure.ort.paired_sessions` times them locally."""
        shas = [hashlib.sha256(m).hexdigest() for m in (reference, candidate)]
        models = dict(zip(shas, (reference, candidate), strict=True))
        request = {
            "reference": shas[0],
            "candidate": shas[1],
            "input": _encoded(example),
            "threads": threads,
            "rounds": rounds,
            "target_seconds": target_seconds,
        }
        answer = self._with_models("/time", request, models)
        return _parsed(PairedLatency.from_dict, answer, self.url)

    def latency(self, model: bytes, example: Any, *, threads: int | None, **timing: float) -> Latency:
        """One ONNX model's latency on the device (:func:`ranksearch.measure.timing.time_repeatedly`'s ``timing``)."""
        sha = hashlib.sha256(model).hexdigest()
        request = {"model": sha, "input": _encoded(example), "threads": threads, "timing": timing}
        return _parsed(Latency.from_dict, self._with_models("/latency", request, {sha: model}), self.url)

    def _with_models(self, path: str, request: dict[str, Any], models: dict[str, bytes]) -> dict[str, Any]:
        """POST ``request``; models the server lacks (first use, or it was restarted) are uploaded and it is sent
        again."""
        body = json.dumps(request).encode()
        for _ in range(RESENDS):
            answer = self._retried("POST", path, body)
            missing = answer.get("missing") if answer.get("status") == 404 else None
            if not missing:
                return answer
            for sha in missing:
                if sha not in models:
                    raise TrialFailure(f"target {self.url} asked for a model it was not sent ({sha[:12]})")
                self._upload(sha, models[sha])
        raise TrialFailure(f"target {self.url} lost the uploaded models {RESENDS} times; is it restarting in a loop?")

    def _upload(self, sha: str, model: bytes) -> None:
        """PUT the model, unless it is over the server's upload limit (refused here: a server refusing a large body
        drops the connection while it is sent, which would read as a restart)."""
        limit = int(self.described().get("max_upload_bytes", 0))
        if limit and len(model) > limit:
            raise TrialFailure(
                f"target {self.url}: the model's {len(model) / 2**20:.1f} MB exceed its upload limit of "
                f"{limit / 2**20:.1f} MB; start the server with a larger --max-upload-mb"
            )
        self._retried("PUT", f"/models/{sha}", model)

    def _retried(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        """The request, retried while the target refuses connections, for up to ``reconnect_s``."""
        deadline = time.monotonic() + self.reconnect_s
        wait = 0.25
        while True:
            try:
                return self._request(method, path, body, missing_ok=True)
            except _Unreachable as exc:
                if exc.timed_out:
                    raise TrialFailure(f"target {self.url}: no answer in {self.timeout_s:.0f} s ({exc})") from None
                if time.monotonic() + wait > deadline:
                    raise TrialFailure(
                        f"target {self.url}: unreachable for {self.reconnect_s:.0f} s ({exc}); is the server running?"
                    ) from None
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _request(
        self, method: str, path: str, body: bytes | None = None, *, missing_ok: bool = False
    ) -> dict[str, Any]:
        """One request; its JSON answer. A refused token is a :class:`RanksearchError`; another refusal a
        :class:`TrialFailure` with the server's reason (a 404 with ``missing`` models comes back when
        ``missing_ok``, marked ``status``)."""
        headers = {"Content-Type": "application/octet-stream" if method == "PUT" else "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return _json(response.read(), self.url)
        except urllib.error.HTTPError as exc:
            document = _json(exc.read(), self.url, strict=False)
            reason = str(document.get("error", exc.reason))
            if exc.code == 401:
                fix = (
                    f"${TOKEN_ENV} holds another token than the server's; set it to the token the server printed"
                    if self.token
                    else f"set ${TOKEN_ENV} to the token the server printed"
                )
                raise RanksearchError(f"target {self.url} refused the request ({reason}); {fix}") from None
            if exc.code == 404 and missing_ok and document.get("missing"):
                return {**document, "status": 404}
            what = f"the upload of model {path.rsplit('/', 1)[-1][:12]}" if method == "PUT" else f"{method} {path}"
            raise TrialFailure(f"target {self.url} refused {what} ({exc.code}: {reason})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            cause = getattr(exc, "reason", exc)
            reason = first_line(cause) if isinstance(cause, BaseException) else str(cause)
            timed_out = isinstance(cause, TimeoutError) or isinstance(exc, TimeoutError)
            raise _Unreachable(reason, timed_out=timed_out) from None


def _encoded(example: Any) -> dict[str, object]:
    import numpy

    array = numpy.ascontiguousarray(example, dtype=numpy.float32)
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode()}


def _json(data: bytes, url: str, *, strict: bool = True) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        document = None
    if isinstance(document, dict):
        return document
    if strict:
        raise TrialFailure(f"target {url} answered something other than JSON; is it a ranksearch target?")
    return {}


def _parsed(parse: Any, answer: dict[str, Any], url: str) -> Any:
    try:
        return parse(answer)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrialFailure(f"target {url} answered a malformed timing ({first_line(exc)})") from None
