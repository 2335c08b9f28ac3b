"""Remote latency targets on loopback: a real `ranksearch target serve` process, real ONNX models, real faults
(a wrong or missing token, oversized and malformed uploads, a model the target cannot run, a target that never
answers, the server killed and restarted mid-request and mid-search)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import conftest
import pytest
import torch
from conftest import space_yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.measure.onnx import export_onnx
from ranksearch.measure.remote import RemoteTarget
from ranksearch.measure.target_server import TOKEN_ENV
from ranksearch.models import build_model
from ranksearch.study import run_search

TOKEN = "loopback-token"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``ranksearch-target`` in its own process, torch made unimportable (the server must not need it)."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.extra = extra
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> ServerProcess:
        code = (
            "import sys; sys.modules['torch'] = None; sys.modules['optuna'] = None\n"
            "from ranksearch.measure.target_server import main\n"
            f"sys.exit(main(['--host', '127.0.0.1', '--port', '{self.port}', '--token', '{TOKEN}', '--threads', '1',"
            f" *{list(self.extra)!r}]))"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        first = self.process.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("ranksearch target: onnxruntime"), first + self.process.communicate()[0]
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            self.log.append(line)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, what: str) -> int:
        return sum(what in line for line in self.log)

    def logged(self, what: str, count: int, *, timeout: float = 10.0) -> int:
        """How many log lines hold ``what``, once ``count`` do or ``timeout`` seconds pass: the server logs a request
        after its answer is sent, so the client can have it before the line is read."""
        deadline = time.monotonic() + timeout
        while self.requests(what) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.requests(what)


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(free_port()).start()
    yield process
    process.kill()


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The dense tiny-problem ResNet-18 and a one-conv model, exported, and the example they run on."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    dense = build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()
    small = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)).eval()
    example = torch.randn(1, 1, 28, 28)
    export_onnx(dense, example, root / "dense.onnx")
    export_onnx(small, example, root / "small.onnx")
    return {"dense": (root / "dense.onnx").read_bytes(), "small": (root / "small.onnx").read_bytes()}


EXAMPLE = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1)).numpy()


def test_the_server_times_a_pair_as_local_timing_does_without_torch(
    server: ServerProcess, token: str, onnx_models: dict[str, bytes]
) -> None:
    target = RemoteTarget.from_url(server.url)
    info = target.info()
    assert info["runtime"].startswith("onnxruntime") and info["threads"] == 1 and info["protocol"] == 1
    dense, small = onnx_models["dense"], onnx_models["small"]
    paired = target.speedup(dense, small, EXAMPLE, threads=1, rounds=3, target_seconds=0.3)
    assert len(paired.ratios) == 3 and paired.speedup > 1  # a one-conv model beats a ResNet-18 (by ~40x)
    assert paired.candidate.backend == "onnxruntime" and paired.candidate.threads == 1 and paired.reference.runs >= 30
    assert server.logged("PUT /models/", 2) == 2  # uploaded once each, on the server's first request for them
    again = target.speedup(dense, dense, EXAMPLE, threads=1, rounds=2, target_seconds=0.2)
    assert len(again.ratios) == 2 and server.logged("PUT /models/", 2) == 2  # held: not uploaded again
    latency = target.latency(onnx_models["small"], EXAMPLE, threads=1, warmup=1, min_runs=5, target_seconds=0.05)
    assert latency.median_ms > 0 and latency.runs >= 5


def raw(server: ServerProcess, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **headers})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("sent", [None, "not-the-token"])
def test_a_missing_or_wrong_token_is_one_line_and_no_model_is_accepted(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch, onnx_models: dict[str, bytes], sent: str | None
) -> None:
    if sent is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, sent)
    target = RemoteTarget.from_url(server.url)
    with pytest.raises(rs.RanksearchError) as refused:
        target.info()
    assert f"${TOKEN_ENV}" in str(refused.value) and "\n" not in str(refused.value)
    assert ("no token was sent" if sent is None else "the token was refused") in str(refused.value)
    with pytest.raises(rs.RanksearchError, match="refused the request"):
        target.speedup(onnx_models["dense"], onnx_models["small"], EXAMPLE, threads=1, rounds=1, target_seconds=0.1)
    sha = hashlib.sha256(onnx_models["small"]).hexdigest()
    status, answer = raw(server, "PUT", f"/models/{sha}", onnx_models["small"], Authorization=f"Bearer {sent}")
    assert status == 401 and answer["error"] in ("no token was sent", "the token was refused")
    assert server.logged('"POST /time HTTP/1.1" 401', 1) == 1 and server.requests('" 201 ') == 0  # nothing stored


def test_oversized_and_malformed_uploads_are_refused(server: ServerProcess, onnx_models: dict[str, bytes]) -> None:
    sha = hashlib.sha256(onnx_models["small"]).hexdigest()
    status, answer = raw(server, "PUT", f"/models/{sha}", b"", **{"Content-Length": str(2**40)})
    assert status == 413 and "upload limit" in answer["error"]  # refused from its header, before a byte is read
    status, answer = raw(server, "PUT", f"/models/{'0' * 64}", onnx_models["small"])
    assert status == 400 and "SHA-256" in answer["error"]
    garbage = b"\x08\x01not an onnx model"
    status, answer = raw(server, "PUT", f"/models/{hashlib.sha256(garbage).hexdigest()}", garbage)
    assert status == 422 and "ONNX Runtime cannot load it" in answer["error"]
    status, answer = raw(server, "POST", "/time", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    request = {"reference": sha, "candidate": sha, "input": {"shape": [1, 2], "dtype": "float32", "data": "AAAA"}}
    status, answer = raw(server, "POST", "/time", json.dumps({**request, "rounds": 1, "target_seconds": 0.1}).encode())
    assert status == 400 and "does not fit its shape" in answer["error"]
    request["input"]["data"] = "AAAAAAAAAAA="  # two float32 zeros: the input is well-formed now
    status, answer = raw(server, "POST", "/time", json.dumps({**request, "rounds": 10**6}).encode())
    assert status == 400 and answer["error"].startswith("rounds:")
    status, answer = raw(server, "GET", "/nothing")
    assert status == 404
    assert server.requests('" 201 ') == 0  # nothing was stored


def test_a_model_over_the_limit_or_the_target_cannot_run_fails_the_trial_with_its_reason(
    token: str, onnx_models: dict[str, bytes]
) -> None:
    small_limit = ServerProcess(free_port(), "--max-upload-mb", "1").start()
    try:
        target = RemoteTarget.from_url(small_limit.url)
        dense, small = onnx_models["dense"], onnx_models["small"]
        with pytest.raises(
            rs.TrialFailure, match=r"exceed its upload limit of 1\.0 MB; start the server with a larger"
        ):
            target.speedup(dense, small, EXAMPLE, threads=1, rounds=1, target_seconds=0.1)
        wrong_input = torch.randn(1, 1, 30, 30).numpy()  # the models take 28 x 28
        with pytest.raises(rs.TrialFailure, match=r"the models cannot run: .*INVALID_ARGUMENT"):
            target.speedup(small, small, wrong_input, threads=1, rounds=1, target_seconds=0.1)
        assert target.info()["server"] == "ranksearch-target"  # the server goes on
    finally:
        small_limit.kill()


def test_a_target_that_never_answers_times_out_and_one_that_is_down_fails_after_reconnecting(
    token: str, onnx_models: dict[str, bytes]
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        target = RemoteTarget(url=f"http://127.0.0.1:{silent.getsockname()[1]}", token=token, timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(rs.TrialFailure, match="no answer in 1 s"):
            target.speedup(onnx_models["small"], onnx_models["small"], EXAMPLE, threads=1, rounds=1, target_seconds=0.1)
        assert time.monotonic() - start < 10
    finally:
        silent.close()
    down = RemoteTarget(url=f"http://127.0.0.1:{free_port()}", token=token, reconnect_s=1.5)
    with pytest.raises(rs.TrialFailure, match=r"unreachable for 2 s \(.*refused.*\); is the server running\?"):
        down.speedup(onnx_models["small"], onnx_models["small"], EXAMPLE, threads=1, rounds=1, target_seconds=0.1)
    with pytest.raises(rs.RanksearchError, match=r"no answer .*start `ranksearch target serve` on the device"):
        down.info()


def test_a_server_killed_mid_request_and_restarted_is_retried(token: str, onnx_models: dict[str, bytes]) -> None:
    first = ServerProcess(free_port()).start()
    target = RemoteTarget.from_url(first.url)
    target.info()
    answer: dict[str, object] = {}

    def time_pair() -> None:
        try:
            answer["paired"] = target.speedup(  # 10 rounds of up to 200 dense runs: seconds on any host
                onnx_models["dense"], onnx_models["small"], EXAMPLE, threads=1, rounds=10, target_seconds=4.0
            )
        except Exception as exc:  # reported below
            answer["error"] = exc

    worker = threading.Thread(target=time_pair)
    worker.start()
    deadline = time.monotonic() + 30
    while first.requests('"PUT /models/') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the pair is being timed (a round stops at 200 runs: 2 rounds ended within 0.5 s on a fast host)
    first.kill()
    time.sleep(1.0)
    second = ServerProcess(first.port).start()  # a fresh server: it holds no models
    try:
        worker.join(timeout=60)
        assert "error" not in answer, (answer.get("error"), first.log, second.log)
        assert answer["paired"].speedup > 1  # type: ignore[union-attr]
        assert second.logged("PUT /models/", 2) == 2 and second.logged('"POST /time HTTP/1.1" 200', 1) == 1
    finally:
        second.kill()


def test_bad_target_options_are_one_line() -> None:
    cases = [
        (["run", "--target", "board:8765"], "--target 'board:8765': not a target address; pass http://HOST:PORT"),
        (
            ["run", "--target", "http://127.0.0.1:1", "--latency-backend", "torch"],
            "times ONNX exports in ONNX Runtime, not --latency-backend torch",
        ),
        (["target", "serve", "--threads", "0"], "--threads 0: must be positive"),
        (["target", "serve", "--max-upload-mb", "-1"], "--max-upload-mb -1.0: must be positive"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_a_search_on_a_remote_target_survives_its_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """The whole search timed on a loopback target that is killed once the first trial is timed and restarted a
    second later: every trial completes, timed there (paired, in rounds), and a refused token stops a rerun."""
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=28).state_dict(), weights)
    space = space_yaml(techniques={"spatial_conv": ["keep", "svd", "tucker2"], "pointwise_conv": ["keep"]})
    first = ServerProcess(free_port()).start()
    settings = conftest.tiny_settings(
        tmp_path,
        space_text=space,
        checkpoint=weights,
        budget=3,
        finetune_steps=2,
        promote_steps="0",
        final_epochs=0,
        study_name="remote",
        latency_backend="onnxruntime",
        target=first.url,
    )
    restarted: list[ServerProcess] = []

    def restart_after_first_timing() -> None:
        deadline = time.monotonic() + 300
        while not first.requests('"POST /latency HTTP/1.1" 200') and time.monotonic() < deadline:  # the table
            time.sleep(0.05)
        timed = first.requests('"POST /time HTTP/1.1" 200')  # the baseline's
        while first.requests('"POST /time HTTP/1.1" 200') == timed and time.monotonic() < deadline:  # trial 0's
            time.sleep(0.05)
        first.kill()
        time.sleep(1.0)
        restarted.append(ServerProcess(first.port).start())

    watcher = threading.Thread(target=restart_after_first_timing)
    watcher.start()
    try:
        result = run_search(settings)
        watcher.join(timeout=60)
        assert restarted, "the server was never restarted"
        trials = result.study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [t.user_attrs.get("fail_reason") for t in trials]
        for trial in trials:
            attrs = trial.user_attrs
            assert attrs["latency_rounds"] == 4 and attrs["speedup_low"] <= attrs["speedup_high"]
        assert restarted[0].logged('"POST /time HTTP/1.1" 200', 1) >= 1  # the later trials were timed by the new one
        assert result.study.user_attrs["settings"]["target"] == first.url
        monkeypatch.setenv(TOKEN_ENV, "stale")
        with pytest.raises(rs.RanksearchError, match="token was refused"):
            run_search(settings.replace(budget=4))
        after = result.study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        assert [t.number for t in after] == [t.number for t in trials]  # nothing was added, nothing lost
    finally:
        for process in [first, *restarted]:
            if process.process is not None and process.process.poll() is None:
                process.kill()


def test_the_server_command_needs_no_torch_and_names_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (
            "import sys; sys.modules['torch'] = None\n"
            "from ranksearch.measure.target_server import main\n"
            f"sys.exit(main(['--host', '127.0.0.1', '--port', '{port}']))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, TOKEN_ENV: ""}
        )
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}"), done.stderr
    assert "Traceback" not in done.stderr
