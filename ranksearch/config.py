"""The replayable compression record: per-layer choices keyed by qualified module name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ranksearch.errors import RanksearchError
from ranksearch.util import atomic_write_text, first_line

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerChoice:
    """What to do with one layer: a technique, its rank(s), and orthogonal options."""

    technique: str
    rank: int | float | tuple[int | float, ...] | None = None
    int8: bool = False
    data_aware: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"technique": self.technique}
        if self.rank is not None:
            out["rank"] = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        if self.int8:
            out["int8"] = True
        if self.data_aware:
            out["data_aware"] = True
        if self.options:
            out["options"] = dict(self.options)
        return out

    @classmethod
    def from_dict(cls, name: str, raw: object) -> LayerChoice:
        if isinstance(raw, str):
            return cls(technique=raw)
        if not isinstance(raw, Mapping) or "technique" not in raw:
            raise RanksearchError(f"layer {name!r}: expected a mapping with a 'technique' key, got {raw!r}")
        unknown = sorted(set(raw) - {"technique", "rank", "int8", "data_aware", "options"})
        if unknown:
            allowed = "technique, rank, int8, data_aware, options"
            raise RanksearchError(f"layer {name!r}: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
        rank = raw.get("rank")
        return cls(
            technique=str(raw["technique"]),
            rank=tuple(rank) if isinstance(rank, list) else rank,
            int8=bool(raw.get("int8", False)),
            data_aware=bool(raw.get("data_aware", False)),
            options=dict(raw.get("options") or {}),
        )


@dataclass(frozen=True)
class CompressionConfig:
    """Per-layer choices for a whole model, plus how ranks were rounded and where it came from.

    ``model`` (optional) says how to rebuild the uncompressed model (``name``, ``num_classes``,
    ``in_channels``, ``image_size``, ``checkpoint``; see :func:`ranksearch.results.build.build_from_config`);
    ``meta`` (optional) is provenance: the study, trial, measured metrics, settings and versions.
    """

    layers: Mapping[str, LayerChoice]
    rank_multiple: int = 8
    meta: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "rank_multiple": self.rank_multiple,
            **({"model": dict(self.model)} if self.model else {}),
            "layers": {name: choice.to_dict() for name, choice in self.layers.items()},
            **({"meta": dict(self.meta)} if self.meta else {}),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CompressionConfig:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("layers"), Mapping):
            raise RanksearchError("config: expected a mapping with a 'layers' mapping of layer name -> choice")
        version = raw.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise RanksearchError(f"config: format version {version} is not supported (expected {FORMAT_VERSION})")
        for key in ("model", "meta"):
            if not isinstance(raw.get(key) or {}, Mapping):
                raise RanksearchError(f"config: '{key}' must be a mapping, got {raw[key]!r}")
        return cls(
            layers={str(n): LayerChoice.from_dict(str(n), c) for n, c in raw["layers"].items()},
            rank_multiple=int(raw.get("rank_multiple", 8)),
            meta=dict(raw.get("meta") or {}),
            model=dict(raw.get("model") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> CompressionConfig:
        """Read a JSON or YAML (``.yaml``/``.yml``) file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RanksearchError(f"config {path}: cannot be read ({exc.strerror}); check the path") from None
        try:
            if path.suffix in {".yaml", ".yml"}:
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:
            raise RanksearchError(
                f"config {path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {first_line(exc)}"
            ) from None
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> Path:
        """Write JSON (or YAML for ``.yaml``/``.yml``) atomically."""
        path = Path(path)
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(path, text)
        return path

    def split_int8(self) -> tuple[CompressionConfig, list[str]]:
        """This config without int8, and the layers to quantize after fine-tuning."""
        float_layers = {name: replace(choice, int8=False) for name, choice in self.layers.items()}
        int8_layers = [name for name, choice in self.layers.items() if choice.int8]
        return replace(self, layers=float_layers), int8_layers

    @classmethod
    def coerce(cls, config: CompressionConfig | Mapping[str, Any] | str | Path) -> CompressionConfig:
        if isinstance(config, CompressionConfig):
            return config
        if isinstance(config, (str, Path)):
            return cls.load(config)
        return cls.from_dict(config)
