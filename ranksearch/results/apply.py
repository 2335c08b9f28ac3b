"""``ranksearch apply``: compress trained weights as an exported config says, save the model, time it beside the
uncompressed model on each latency backend asked for."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.ao.nn.quantized as nnq
from rich.console import Console
from rich.table import Table
from torch import nn

from ranksearch.compress import quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError, TrialFailure
from ranksearch.measure.backends import latency_backend, latency_backend_title
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.onnx import OnnxExport, export_onnx, require_onnxruntime
from ranksearch.measure.timing import Latency, PairedLatency
from ranksearch.results.front import MAX_ROUND_SPREAD
from ranksearch.util import atomic_open

APPLY_ROUNDS = 10
"""Alternating rounds of each backend's timing, as the search re-times its front: a config no faster than the dense
model is faster in all of them with probability 1/1024 at most."""
APPLY_SECONDS = 2.0
"""Seconds each backend's timing spends on both models together."""


@dataclass(frozen=True)
class BackendTiming:
    """Both models timed by one latency backend in alternating rounds, and what the backend recorded."""

    backend: str
    paired: PairedLatency | None
    """None when the backend cannot run the models (``failure`` says why)."""
    extra: dict[str, float]
    failure: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    """What ``ranksearch apply`` wrote and measured."""

    out: Path
    onnx: OnnxExport | None
    batch: int
    params: dict[str, int]
    """Parameters of the ``uncompressed`` and the ``compressed`` model."""
    timings: list[BackendTiming]
    folded: bool = True
    """Whether both models were timed with BatchNorm folded (as the search times them)."""
    from_search: tuple[str, ...] = ()
    """The timing settings taken from the search that the config came from (e.g. ``threads 4``), none asked for."""


def apply_to_checkpoint(
    config: str | Path,
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    onnx: str | Path | None = None,
    backends: Sequence[str] | None = None,
    threads: int | None = None,
    batch: int | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    trust_checkpoint: bool = False,
    console: Console | None = None,
) -> ApplyResult:
    """Compress the trained model as ``config`` says and save it; optionally export it to ONNX; time it beside the
    uncompressed model.

    The model is rebuilt from ``config``'s ``model`` section (a ``ranksearch export`` file) with
    the uncompressed weights of ``checkpoint`` (default: the one the config records), compressed
    (see :func:`ranksearch.results.build.build_from_config`), and saved whole to ``out``:
    ``model = torch.load(out, weights_only=False)`` loads it back (with ranksearch installed).
    Int8 and data-aware layers are calibrated on training images of ``dataset`` (default: the
    one the config's study used, read from ``data_root``). ``trust_checkpoint`` lets a whole pickled model load
    (see :func:`ranksearch.models.load_checkpoint`). With ``onnx``, the single-file ONNX
    model is written there after checking ONNX Runtime's output against torch's. Both models are then timed as the
    search times them, in their deployed form (BatchNorm folded into the layer before it:
    :func:`~ranksearch.measure.deployed.fold_batchnorm`), at batch ``batch`` on ``threads`` threads, by each of the
    latency ``backends`` (:mod:`ranksearch.measure.backends`) in :data:`APPLY_ROUNDS` alternating rounds; the table
    goes to ``console``. What is not given is timed as the search that the config came from timed its trials (its
    ``meta.settings``: :func:`searched_timing`), so the speedup is comparable with the one the config records; else
    eager torch, the backend's own thread count and batch 1. ONNX Runtime is added with ``onnx``.
    """
    from ranksearch.results.build import build_from_config

    config = CompressionConfig.coerce(config)
    searched = searched_timing(config)
    from_search = tuple(
        f"{name} {value}"
        for name, value, given in (
            ("backend", searched.backend, bool(backends)),
            ("threads", searched.threads, threads is not None),
            ("batch", searched.batch, batch is not None),
        )
        if value is not None and not given
    )
    threads = threads if threads is not None else searched.threads
    batch = batch if batch is not None else searched.batch or 1
    names = (
        list(backends) if backends else [searched.backend or "torch", *(["onnxruntime"] if onnx is not None else [])]
    )
    chosen = [latency_backend(name) for name in dict.fromkeys(names)]  # an unknown name lists the others
    if onnx is not None:
        require_onnxruntime()
    for backend in chosen:
        backend.check_installed()
    for option, value in (("--batch", batch), ("--threads", threads)):
        if value is not None and value <= 0:
            raise RanksearchError(f"{option} {value}: must be positive")
    checkpoint = checkpoint if checkpoint is not None else config.model.get("checkpoint")
    if checkpoint is None:
        raise RanksearchError(
            "no trained weights: the config records no checkpoint; pass --checkpoint with the uncompressed model's"
        )
    calib = _calibration_inputs(config, dataset, data_root)
    trust = trust_checkpoint
    dense = build_from_config(replace(config, layers={}), checkpoint=checkpoint, trust_checkpoint=trust)
    compressed = build_from_config(config, checkpoint=checkpoint, trust_checkpoint=trust, calib_inputs=calib)
    spec = config.model
    example = torch.randn(
        batch, int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"]),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    timed = _deployed_forms(dense, config, checkpoint, trust, calib)
    exported = None
    if onnx is not None:
        float_config, int8_layers = config.split_int8()
        unquantized = None  # an int8 export is checked against the model before quantization
        if int8_layers:
            unquantized = build_from_config(
                float_config, checkpoint=checkpoint, trust_checkpoint=trust, calib_inputs=calib
            )
        exported = export_onnx(compressed, example, onnx, float_model=unquantized)
    out = Path(out)
    try:
        with atomic_open(out, "wb") as handle:
            torch.save(compressed, handle)
    except OSError as exc:
        raise RanksearchError(f"--out {out}: cannot be written ({exc.strerror}); pass a writable path") from None
    pair = (timed.dense, timed.compressed) if timed is not None else (dense, compressed)
    float_model = timed.float_model if timed is not None else None
    timings = []
    for backend_class in chosen:
        backend = backend_class(device=torch.device("cpu"), threads=threads)
        try:
            result = backend.time_beside(
                *pair, example, rounds=APPLY_ROUNDS, target_seconds=APPLY_SECONDS, float_model=float_model
            )
        except TrialFailure as exc:  # the models do not run on this target: say why, time the others
            timings.append(BackendTiming(backend.name, None, {}, failure=str(exc)))
            continue
        timings.append(BackendTiming(backend.name, result.paired, result.extra))
    params = {"uncompressed": _param_count(dense), "compressed": _param_count(compressed)}
    applied = ApplyResult(out, exported, batch, params, timings, folded=timed is not None, from_search=from_search)
    print_apply(applied, console or Console())
    return applied


class SearchedTiming(NamedTuple):
    """How the search that a config came from timed its trials; None where the config does not record it."""

    backend: str | None
    threads: int | None
    batch: int | None


def searched_timing(config: CompressionConfig) -> SearchedTiming:
    """The latency backend, threads and batch recorded in ``config``'s ``meta.settings`` (``ranksearch export`` writes
    them; a hand-written config has none, and a search left to torch's own thread count records none). A value that
    is not a positive count (an edited config) is a :class:`RanksearchError` naming it."""
    settings = dict(config.meta.get("settings") or {})
    backend = settings.get("latency_backend")
    return SearchedTiming(
        backend=None if backend is None else str(backend),
        threads=_recorded_count(settings, "threads"),
        batch=_recorded_count(settings, "latency_batch"),
    )


def _recorded_count(settings: dict[str, object], key: str) -> int | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RanksearchError(
            f"the config's meta.settings.{key} {value!r} is not a positive whole number; fix it there (or remove it)"
        )
    return value


class _Deployed(NamedTuple):
    """Both models as the search times them, and the compressed one before quantization (its int8 layers' check)."""

    dense: nn.Module
    compressed: nn.Module
    float_model: nn.Module | None


def _deployed_forms(
    dense: nn.Module, config: CompressionConfig, checkpoint: str | Path, trust: bool, calib: torch.Tensor | None
) -> _Deployed | None:
    """The uncompressed and the compressed model as the search timed them: BatchNorm folded into the layer before it,
    then the int8 layers quantized; None when either does not fold (both are then timed as built)."""
    from ranksearch.results.build import build_from_config

    float_config, int8_layers = config.split_int8()
    float_model = build_from_config(float_config, checkpoint=checkpoint, trust_checkpoint=trust, calib_inputs=calib)
    folded_dense, folded_model = fold_batchnorm(dense), fold_batchnorm(float_model)
    if not (folded_dense.folded and folded_model.folded):
        return None
    if not int8_layers:
        return _Deployed(folded_dense.model, folded_model.model, None)
    quantized = quantize_layers(copy.deepcopy(folded_model.model), int8_layers, calib)
    return _Deployed(folded_dense.model, quantized, folded_model.model)


def _param_count(model: nn.Module) -> int:
    """Parameters, counting the int8 layers' packed weights and biases (they are not ``nn.Parameter``s)."""
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, nnq.Conv2d | nnq.Linear):
            count += module.weight().numel() + (0 if module.bias() is None else module.bias().numel())
    return count


def _calibration_inputs(
    config: CompressionConfig, dataset: str | None, data_root: str | Path | None
) -> torch.Tensor | None:
    """Training images for int8/data-aware layers, taken as the search took them; None when no layer needs any."""
    needing = [name for name, choice in config.layers.items() if choice.int8 or choice.data_aware]
    if not needing:
        return None
    from ranksearch.data import Preprocessing, load_dataset
    from ranksearch.evaluate.classification import calibration_batch
    from ranksearch.models import pretrained_preprocessing

    settings = dict(config.meta.get("settings") or {})
    dataset = dataset or settings.get("dataset")
    if dataset is None:
        raise RanksearchError(
            f"layer {needing[0]!r} is int8/data-aware and needs calibration images, but the config names no dataset; "
            "pass --dataset"
        )
    pretrained = pretrained_preprocessing(str(settings.get("model", "")), settings.get("weights"))
    splits = load_dataset(
        str(dataset),
        root=Path(data_root or settings.get("data_root") or "data"),
        val_fraction=float(settings.get("val_fraction", 0.1)),
        seed=int(settings.get("seed", 0)),
        train_subset=settings.get("train_subset"),
        preprocessing=None if pretrained is None else Preprocessing(**pretrained),
        image_size=settings.get("image_size"),
    )
    return calibration_batch(
        splits.train,
        batch_size=int(settings.get("batch_size", 128)),
        batches=int(settings.get("calib_batches", 4)),
        seed=int(settings.get("seed", 0)),
    )


def print_apply(result: ApplyResult, console: Console) -> None:
    """The table of :func:`apply_to_checkpoint`: per backend, both models' median ms (p10-p90) and the speedup with the
    range of its rounds; the parameters and the files written below it."""
    timed = [t.paired for t in result.timings if t.paired is not None]
    form = "BatchNorm folded" if result.folded else "BatchNorm not folded (the model cannot be traced)"
    threads = f"{timed[0].reference.threads} thread(s)" if timed else "no timing"
    title = f"latency at batch {result.batch}, {threads}, CPU, {form}, {APPLY_ROUNDS} alternating rounds"
    table = Table("target", "uncompressed ms (p10-p90)", "compressed ms (p10-p90)", "speedup (rounds)", title=title)
    for timing in result.timings:
        paired = timing.paired
        if paired is None:
            table.add_row(latency_backend_title(timing.backend), "-", "-", f"cannot time: {timing.failure}")
            continue
        speedup = f"{paired.speedup:.2f}x ({paired.speedup_low:.2f}-{paired.speedup_high:.2f})"
        table.add_row(latency_backend_title(timing.backend), _ms(paired.reference), _ms(paired.candidate), speedup)
    params = result.params
    written = [
        f"{latency_backend_title(t.backend)}: {', '.join(f'{key} {value:g}' for key, value in t.extra.items())}"
        for t in result.timings
        if t.extra
    ]
    written += [
        f"{latency_backend_title(t.backend)}: rounds disagree by more than {MAX_ROUND_SPREAD:g}x (a busy or drifting "
        "machine); time again before trusting the size of this speedup"
        for t in result.timings
        if t.paired is not None and t.paired.speedup_high > MAX_ROUND_SPREAD * t.paired.speedup_low
    ]
    if result.from_search:
        written.append(
            f"timed as the search timed its trials ({', '.join(result.from_search)}: the config's settings); "
            "--latency-backend, --threads and --batch time it otherwise"
        )
    written += [
        f"params: {params['uncompressed'] / 1e6:.3f} M uncompressed, {params['compressed'] / 1e6:.3f} M compressed",
        f"wrote {result.out} (load: torch.load(path, weights_only=False))",
    ]
    if result.onnx is not None:
        written.append(
            f"wrote {result.onnx.path} ({result.onnx.size_bytes / 1e6:.1f} MB, opset {result.onnx.opset}), "
            f"max abs error vs torch {result.onnx.max_abs_error:.2g} (tolerance {result.onnx.tolerance:.2g})"
        )
    table.caption = "\n".join(written)
    console.print(table)


def _ms(latency: Latency) -> str:
    return f"{latency.median_ms:.3f} ({latency.p10_ms:.3f}-{latency.p90_ms:.3f})"
