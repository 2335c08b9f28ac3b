"""A child process that compiles and times pairs (trials) and single layers (the latency table) for the torch.compile
latency backend, so that the memory compiled graphs keep (which resetting dynamo does not give back) goes with the
process.

The parent (:class:`CompilingProcess`) starts ``python -m ranksearch.measure.compile_worker``: a module entry point,
so nothing of the caller's ``__main__`` is imported again (multiprocessing's spawn would re-run an unguarded user
script). Requests and answers are length-prefixed ``torch.save`` payloads on the child's stdin and stdout, written
and read by these two processes only.
"""

from __future__ import annotations

import io
import logging
import signal
import struct
import subprocess
import sys
from typing import IO, Any

import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.measure.timing import PairedLatency
from ranksearch.util import first_line

PAIRS_PER_PROCESS = 8
"""Pairs one child compiles and times before a fresh one replaces it."""
LAYERS_PER_PROCESS = 128
"""Single layers (the latency table's variants) one child compiles and times before a fresh one replaces it."""
CLOSE_GRACE_S = 2.0
"""How long a closed child may take to exit before it is killed."""
_HEADER = struct.Struct("<Q")


class CompilingProcess:
    """Compiles and times pairs (:func:`~ranksearch.measure.compiled.compiled_pair_timing`) and single layers
    (:func:`~ranksearch.measure.compiled.compiled_layer_ms`) in a child process, replaced after ``pairs_per_process``
    pairs or ``layers_per_process`` layers. Measured: ten trials' compiled timings of 28 px resnet18 configs grew
    one process from 1.17 to 2.24 GB; timed in children, the parent stayed at 1.0-1.24 GB, and the speedups matched
    those timed in-process (median ratio 1.007 over six interleaved pairs). A child that dies mid-pair is a
    :class:`RanksearchError`; the next pair starts a new one. Models whose classes the child cannot import (defined
    in a script's ``__main__``) are timed in this process instead, as :attr:`in_process` then says."""

    def __init__(
        self, *, pairs_per_process: int = PAIRS_PER_PROCESS, layers_per_process: int = LAYERS_PER_PROCESS
    ) -> None:
        self.limits = {"pair": pairs_per_process, "layer": layers_per_process}
        self.in_process = False
        """Set when a model could not be sent to a child: this and later ones are timed here."""
        self._child: subprocess.Popen[bytes] | None = None
        self._counts = {"pair": 0, "layer": 0}

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first pair, or after :meth:`close`)."""
        return None if self._child is None else self._child.pid

    def time_pair(
        self,
        reference: nn.Module,
        model: nn.Module,
        example: torch.Tensor,
        *,
        threads: int | None,
        rounds: int,
        target_seconds: float,
    ) -> tuple[PairedLatency, dict[str, float]]:
        """The pair compiled and timed in the child (its one-line error raised here)."""
        timing = {"threads": threads, "rounds": rounds, "target_seconds": target_seconds}
        answer = self._ask("pair", {"reference": reference, "model": model, "example": example, "timing": timing})
        if answer is None:
            from ranksearch.measure.compiled import compiled_pair_timing

            return compiled_pair_timing(reference, model, example, **timing)
        return answer["paired"], answer["extra"]

    def time_layer(self, module: nn.Module, inputs: torch.Tensor, *, threads: int | None, **timing: Any) -> float:
        """``module`` compiled and timed alone in the child, its median ms (``timing``: as
        :func:`~ranksearch.measure.timing.time_repeatedly` takes it)."""
        answer = self._ask("layer", {"module": module, "inputs": inputs, "threads": threads, "timing": timing})
        if answer is None:
            from ranksearch.measure.compiled import compiled_layer_ms

            return compiled_layer_ms(module, inputs, threads=threads, **timing)
        return answer["median_ms"]

    def _ask(self, kind: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """The child's answer to ``request`` (a fresh child once this one served its share); its error raised here.
        None when the model is to be timed in this process: the child could not import its classes, now or before
        (:attr:`in_process`)."""
        if self.in_process:
            return None
        if self._child is None or self._counts[kind] >= self.limits[kind]:
            self.close()
            self._child = subprocess.Popen(
                [sys.executable, "-m", "ranksearch.measure.compile_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        self._counts[kind] += 1
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        try:
            _send(child.stdin, {"kind": kind, **request})
            answer = _receive(child.stdout)
        except (OSError, EOFError):
            self.close()
            raise RanksearchError(
                "torch.compile's process died while compiling or timing the model (out of memory?); "
                "use --latency-backend torch or onnxruntime"
            ) from None
        if "unreadable" in answer:  # a class the child cannot import: time here from now on
            self.close()
            self.in_process = True
            return None
        if "error" in answer:
            raise RanksearchError(answer["error"])
        return answer

    def close(self) -> None:
        """End the child: an idle one exits as its input closes; one still busy with a pair (closed on an error or
        an interrupt) is killed after a short grace. A later pair starts a new one."""
        child, self._child = self._child, None
        self._counts = {"pair": 0, "layer": 0}
        if child is None:
            return
        try:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=CLOSE_GRACE_S)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()

    def __del__(self) -> None:
        self.close()


def _send(stream: IO[bytes], payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> dict[str, Any]:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other process ended")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other process ended mid-message")
    return torch.load(io.BytesIO(data), weights_only=False)  # written by the parent process itself


def main() -> None:
    """Serve pairs from stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report; this one ends with its input
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime", once per child
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed while compiling stays off the answer stream
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        except Exception as exc:  # a model class this process cannot import
            answer: dict[str, Any] = {"unreadable": first_line(exc)}
        else:
            answer = _served(request)
        try:
            _send(answers, answer)
        except BrokenPipeError:  # the parent is gone (interrupted or killed): nobody to answer
            return


def _served(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request: the pair's timing or the layer's median ms, or its one-line error."""
    from ranksearch.measure.compiled import compiled_layer_ms, compiled_pair_timing

    try:
        if request["kind"] == "layer":
            module, inputs, timing = request["module"], request["inputs"], request["timing"]
            return {"median_ms": compiled_layer_ms(module, inputs, threads=request["threads"], **timing)}
        paired, extra = compiled_pair_timing(
            request["reference"], request["model"], request["example"], **request["timing"]
        )
    except RanksearchError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # anything else inductor raises: the request fails, the child serves the next one
        return {"error": f"torch.compile failed ({first_line(exc)}); use --latency-backend torch or onnxruntime"}
    return {"paired": paired, "extra": extra}


if __name__ == "__main__":
    main()
