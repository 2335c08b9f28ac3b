"""The settings of one search run, validated before anything is loaded or written."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ranksearch.errors import RanksearchError

SAMPLERS = ("tpe", "nsga2", "random", "gp")
IDENTITY = (
    "model",
    "dataset",
    "checkpoint",
    "weights",
    "space_digest",
    "device",
    "latency_backend",
    "latency_batch",
    "finetune_steps",
    "finetune_lr",
    "batch_size",
    "calib_batches",
    "eval_subset",
    "train_subset",
    "val_fraction",
    "evaluator",
    "seed",
    "baseline_nuclear_norm",
)
"""Settings that define what a study measures: a study resumed with other values is refused."""


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Everything ``ranksearch run`` takes; the CLI options map one to one onto these fields."""

    model: str = "resnet18"
    dataset: str = "fashion_mnist"
    budget: int = 50
    timeout: float | None = None
    space: Path | None = None
    sampler: str = "tpe"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    latency_backend: str = "torch"
    latency_batch: int = 1
    latency_table: bool = True
    sensitivity: bool = True
    early_reject: bool = True
    max_zero_shot_drop: float = 10.0
    finetune_steps: int = 60
    finetune_lr: float = 0.01
    batch_size: int = 128
    calib_batches: int = 4
    eval_subset: int | None = 5000
    train_subset: int | None = None
    val_fraction: float = 0.1
    baseline_epochs: int | None = None
    baseline_nuclear_norm: float = 0.0
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    storage: str | None = None
    workers: int = 1
    heartbeat: int = 10
    study_name: str | None = None
    results_dir: Path = Path("results")
    checkpoint: Path | None = None
    weights: str | None = None
    data_root: Path = Path("data")
    download: bool = False
    evaluator: str | None = None
    space_digest: str = ""

    def validate(self) -> None:
        """Cheap checks of the values alone (files and names are checked when loaded)."""
        if self.budget <= 0:
            raise RanksearchError(
                f"--budget {self.budget}: must be a positive number of completed trials; pass e.g. --budget 50"
            )
        if self.sampler not in SAMPLERS:
            raise RanksearchError(f"--sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        self._validate_latency_backend()
        positive = {
            "--timeout": self.timeout,
            "--threads": self.threads,
            "--workers": self.workers,
            "--heartbeat": self.heartbeat,
            "--latency-batch": self.latency_batch,
            "--batch-size": self.batch_size,
            "--calib-batches": self.calib_batches,
            "--finetune-lr": self.finetune_lr,
            "--eval-subset": self.eval_subset,
            "--train-subset": self.train_subset,
            "--max-latency-ms": self.max_latency_ms,
            "--baseline-epochs": self.baseline_epochs,
        }
        for option, value in positive.items():
            if value is not None and value <= 0:
                raise RanksearchError(f"{option} {value}: must be positive; pass a number above 0 or leave it out")
        if self.finetune_steps < 0:
            raise RanksearchError(
                f"--finetune-steps {self.finetune_steps}: must be 0 or more; pass 0 to skip fine-tuning, e.g. 60"
            )
        if self.baseline_nuclear_norm < 0:
            raise RanksearchError(
                f"--baseline-nuclear-norm {self.baseline_nuclear_norm}: must be 0 (off) or more; pass e.g. 1e-4"
            )
        if self.max_zero_shot_drop < 0:
            raise RanksearchError(
                f"--max-zero-shot-drop {self.max_zero_shot_drop}: must be >= 0 percentage points; "
                "pass e.g. 10, or --no-early-reject"
            )
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise RanksearchError(
                f"--max-accuracy-drop {self.max_accuracy_drop}: must be >= 0 percentage points; pass e.g. 1.0"
            )
        if not 0 < self.val_fraction < 1:
            raise RanksearchError(
                f"--val-fraction {self.val_fraction}: must be between 0 and 1 (exclusive); pass e.g. 0.1"
            )
        if self.study_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.study_name):
            raise RanksearchError(f"--study-name {self.study_name!r}: use letters, digits, '.', '_' and '-' only")

    def _validate_latency_backend(self) -> None:
        from ranksearch.measure.latency import LATENCY_BACKENDS

        backend = self.latency_backend
        if backend not in LATENCY_BACKENDS:
            raise RanksearchError(f"--latency-backend {backend!r} is unknown; choose {' or '.join(LATENCY_BACKENDS)}")
        if backend == "onnxruntime":
            if not self.device.startswith("cpu"):
                raise RanksearchError(
                    f"--latency-backend onnxruntime times on CPU, not --device {self.device}; "
                    "use --device cpu or --latency-backend torch"
                )
            from ranksearch.measure.onnx import require_onnxruntime

            require_onnxruntime()

    def name(self) -> str:
        """The study name: given, or ``<model>-<dataset>-<space>``."""
        if self.study_name:
            return self.study_name
        stem = self.space.stem if self.space else "space"
        model = Path(self.model.split(":")[0]).stem if ":" in self.model else self.model
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{self.dataset}-{stem}")

    def identity(self) -> dict[str, object]:
        return {key: _jsonable(getattr(self, key)) for key in IDENTITY}

    @classmethod
    def default_identity(cls) -> dict[str, object]:
        """The identity entries of fields that have defaults (what a study recorded before a field existed)."""
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return {key: _jsonable(defaults[key]) for key in IDENTITY if key in defaults}

    def to_dict(self) -> dict[str, object]:
        return {key: _jsonable(value) for key, value in asdict(self).items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, recorded: dict[str, object], **changes: object) -> RunSettings:
        """Settings recorded by :meth:`to_dict` (keys this version lacks are dropped), with ``changes`` applied."""
        values = {f.name: recorded[f.name] for f in fields(cls) if f.name in recorded}
        values.update(changes)
        paths = {f.name for f in fields(cls) if "Path" in str(f.type)}
        return cls(**{k: Path(v) if k in paths and isinstance(v, str) else v for k, v in values.items()})


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, Path) else json.loads(json.dumps(value, default=str))
