"""``ranksearch apply``: compress trained weights as an exported config says, save the model, time it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from rich.console import Console
from rich.table import Table
from torch import nn

from ranksearch.compress import quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.latency import measure_latency
from ranksearch.measure.onnx import OnnxExport, export_onnx, onnxruntime_latency, require_onnxruntime
from ranksearch.measure.timing import Latency
from ranksearch.util import atomic_open


@dataclass(frozen=True)
class ApplyRow:
    """One model's size and latency on both backends (ONNX Runtime's when exported)."""

    name: str
    params: int
    torch: Latency
    onnxruntime: Latency | None


@dataclass(frozen=True)
class ApplyResult:
    """What ``ranksearch apply`` wrote and measured."""

    out: Path
    onnx: OnnxExport | None
    batch: int
    rows: list[ApplyRow]
    folded: bool = True
    """Whether torch timed both models with BatchNorm folded (as the search does)."""


def apply_to_checkpoint(
    config: str | Path,
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    onnx: str | Path | None = None,
    threads: int | None = None,
    batch: int = 1,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    trust_checkpoint: bool = False,
    console: Console | None = None,
) -> ApplyResult:
    """Compress the trained model as ``config`` says and save it; optionally export it to ONNX; time both backends.

    The model is rebuilt from ``config``'s ``model`` section (a ``ranksearch export`` file) with
    the uncompressed weights of ``checkpoint`` (default: the one the config records), compressed
    (see :func:`ranksearch.results.build.build_from_config`), and saved whole to ``out``:
    ``model = torch.load(out, weights_only=False)`` loads it back (with ranksearch installed).
    Int8 and data-aware layers are calibrated on training images of ``dataset`` (default: the
    one the config's study used, read from ``data_root``). ``trust_checkpoint`` lets a whole pickled model load
    (see :func:`ranksearch.models.load_checkpoint`). With ``onnx``, the single-file ONNX
    model is written there after checking ONNX Runtime's output against torch's. The uncompressed
    and compressed models are then timed at batch ``batch`` on ``threads`` threads, in torch (as deployed, BatchNorm
    folded into the layer before it: :func:`~ranksearch.measure.deployed.fold_batchnorm`) and
    (with ``onnx``) ONNX Runtime; the table goes to ``console``.
    """
    from ranksearch.results.build import build_from_config

    config = CompressionConfig.coerce(config)
    if onnx is not None:
        require_onnxruntime()
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
    deployed = _deployed_forms(dense, config, checkpoint, trust, calib)
    timed_dense, timed_compressed = deployed or (dense, compressed)
    exported = None
    if onnx is not None:
        float_config, int8_layers = config.split_int8()
        float_model = None  # an int8 export is checked against the model before quantization
        if int8_layers:
            float_model = build_from_config(
                float_config, checkpoint=checkpoint, trust_checkpoint=trust, calib_inputs=calib
            )
        exported = export_onnx(compressed, example, onnx, float_model=float_model)
    out = Path(out)
    try:
        with atomic_open(out, "wb") as handle:
            torch.save(compressed, handle)
    except OSError as exc:
        raise RanksearchError(f"--out {out}: cannot be written ({exc.strerror}); pass a writable path") from None
    with tempfile.TemporaryDirectory(prefix="ranksearch-onnx-") as tmp:
        dense_onnx = None if exported is None else export_onnx(dense, example, Path(tmp) / "dense.onnx").path
        rows = [
            _measure("uncompressed", dense, timed_dense, example, threads, dense_onnx),
            _measure("compressed", compressed, timed_compressed, example, threads, exported and exported.path),
        ]
    result = ApplyResult(out, exported, batch, rows, folded=deployed is not None)
    print_apply(result, console or Console())
    return result


def _deployed_forms(
    dense: nn.Module, config: CompressionConfig, checkpoint: str | Path, trust: bool, calib: torch.Tensor | None
) -> tuple[nn.Module, nn.Module] | None:
    """The uncompressed and the compressed model as the search timed them: BatchNorm folded into the layer before it,
    then the int8 layers quantized; None when either does not fold (both are then timed as built)."""
    from ranksearch.results.build import build_from_config

    float_config, int8_layers = config.split_int8()
    float_model = build_from_config(float_config, checkpoint=checkpoint, trust_checkpoint=trust, calib_inputs=calib)
    folded_dense, folded_model = fold_batchnorm(dense), fold_batchnorm(float_model)
    if not (folded_dense.folded and folded_model.folded):
        return None
    if int8_layers:
        quantize_layers(folded_model.model, int8_layers, calib)
    return folded_dense.model, folded_model.model


def _measure(
    name: str, model: nn.Module, timed: nn.Module, example: torch.Tensor, threads: int | None, onnx: Path | None
) -> ApplyRow:
    """``model``'s parameters, the latency of its ``timed`` form in torch and of its ONNX export."""
    return ApplyRow(
        name,
        _param_count(model),
        measure_latency(timed, example, threads=threads),
        None if onnx is None else onnxruntime_latency(onnx, example, threads=threads),
    )


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
    """The table of :func:`apply_to_checkpoint`: median ms (p10-p90) per model and backend, speedups, files written."""
    first = result.rows[0]
    form = "BatchNorm folded" if result.folded else "BatchNorm not folded (the model cannot be traced)"
    title = f"latency at batch {result.batch}, {first.torch.threads} thread(s), CPU; torch: {form}"
    table = Table("model", "params M", "torch ms (p10-p90)", "speedup", title=title)
    written = [f"wrote {result.out} (load: torch.load(path, weights_only=False))"]
    if result.onnx is not None:
        table.add_column("onnxruntime ms (p10-p90)")
        table.add_column("speedup")
        written.append(
            f"wrote {result.onnx.path} ({result.onnx.size_bytes / 1e6:.1f} MB, opset {result.onnx.opset}), "
            f"max abs error vs torch {result.onnx.max_abs_error:.2g} (tolerance {result.onnx.tolerance:.2g})"
        )
    for row in result.rows:
        cells = [row.name, f"{row.params / 1e6:.3f}", _ms(row.torch), _speedup(first.torch, row.torch)]
        if row.onnxruntime is not None and first.onnxruntime is not None:
            cells += [_ms(row.onnxruntime), _speedup(first.onnxruntime, row.onnxruntime)]
        table.add_row(*cells)
    table.caption = "\n".join(written)
    console.print(table)


def _speedup(reference: Latency, latency: Latency) -> str:
    return f"{reference.median_ms / latency.median_ms:.2f}x"


def _ms(latency: Latency) -> str:
    return f"{latency.median_ms:.3f} ({latency.p10_ms:.3f}-{latency.p90_ms:.3f})"
