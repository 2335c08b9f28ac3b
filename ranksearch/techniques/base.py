"""The base class of every technique, and rank resolution."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from ranksearch.errors import CompressionError
from ranksearch.techniques.cache import FactorCache
from ranksearch.techniques.spec import ConvSpec, LinearSpec, Plan

RankSpec = int | float | Sequence[int | float]
"""An int (absolute rank), a float in (0, 1] (fraction of full rank), or one of either per rank dimension."""

Weights = list[tuple[torch.Tensor, torch.Tensor | None]]


class Technique(ABC):
    """Builds the compressed replacement of one trained layer.

    A technique states where it applies (:meth:`unsupported_reason`), the full rank of each of
    its rank dimensions (:meth:`full_ranks`), what it will build at given ranks (:meth:`plan`,
    shapes only, used by the cost model) and the weights of those layers (:meth:`decompose`).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    exact_at_full_rank: ClassVar[bool] = True
    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    rank_is_multiplier: ClassVar[bool] = False
    data_aware_capable: ClassVar[bool] = False
    default_options: ClassVar[Mapping[str, object]] = {}

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        """Why this technique cannot replace ``layer``, or ``None`` when it can."""
        if isinstance(layer, nn.Linear):
            return None
        if not isinstance(layer, nn.Conv2d):
            return f"only Conv2d and Linear layers are supported, not {type(layer).__name__}"
        if layer.in_channels // layer.groups == 1:
            return "depthwise convolution has no channel redundancy to factorize"
        return None

    @abstractmethod
    def full_ranks(self, layer: nn.Module, options: Mapping[str, object], prefix: tuple[int, ...]) -> tuple[int, ...]:
        """Full rank of every rank dimension; ``prefix`` holds the dimensions already resolved."""

    @abstractmethod
    def plan(self, layer: nn.Module, ranks: tuple[int, ...], options: Mapping[str, object]) -> Plan:
        """The layers this technique builds at ``ranks``, as shapes only."""

    @abstractmethod
    def decompose(
        self,
        layer: nn.Module,
        plan: Plan,
        options: Mapping[str, object],
        cache: FactorCache,
        calib: torch.Tensor | None = None,
    ) -> Weights:
        """Weights and biases of ``plan``'s layers, from ``layer``'s trained weights.

        With ``calib`` (the layer's inputs on calibration data; only for ``data_aware_capable``
        techniques) the decomposition preserves the layer's outputs instead of its weights.
        """

    def options(self, given: Mapping[str, object]) -> dict[str, object]:
        """``given`` merged over the defaults; unknown option names are rejected."""
        unknown = sorted(set(given) - set(self.default_options))
        if unknown:
            allowed = ", ".join(sorted(self.default_options)) or "none"
            raise CompressionError(f"unknown option(s) {', '.join(unknown)} (allowed: {allowed})")
        return {**self.default_options, **given}

    def resolve_ranks(
        self, layer: nn.Module, rank: RankSpec, options: Mapping[str, object], *, multiple: int = 8
    ) -> tuple[int, ...]:
        """Integer ranks from a rank spec.

        Fractions are rounded to the nearest of the multiples of ``multiple`` and the full rank,
        where the full rank is at least ``multiple`` (never for channel multipliers), and clamped
        to ``[1, full]``; integers are taken as given and must lie in ``[1, full]``.
        """
        dims = len(self.rank_names)
        values = list(rank) if isinstance(rank, Sequence) and not isinstance(rank, str) else [rank] * dims
        if len(values) != dims:
            names = ", ".join(self.rank_names)
            raise CompressionError(f"rank needs 1 or {dims} values ({names}), got {len(values)}")
        resolved: list[int] = []
        for name, value in zip(self.rank_names, values):
            full = self.full_ranks(layer, options, tuple(resolved))[len(resolved)]
            resolved.append(_resolve_one(name, value, full, 1 if self.rank_is_multiplier else multiple))
        return tuple(resolved)


def _resolve_one(name: str, value: object, full: int, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CompressionError(f"{name} must be an int or a fraction, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if value < 1:
            raise CompressionError(f"{name} {value} must be at least 1")
        if value > full:
            raise CompressionError(f"{name} {value} is above the full rank {full}")
        return value
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise CompressionError(f"{name} fraction {value} must be in (0, 1]; pass an int for an absolute rank")
    target = value * full
    if multiple > 1 and full >= multiple:
        nearest = min(full, max(multiple, multiple * round(target / multiple)))
        return full if abs(full - target) < abs(nearest - target) else nearest
    return min(full, max(1, round(target)))


def conv_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a 4-D conv kernel (a Linear is a 1x1 conv)."""
    weight = layer.weight.detach()
    return weight[:, :, None, None] if isinstance(layer, nn.Linear) else weight


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def pointwise(
    in_ch: int, out_ch: int, layer: nn.Module, *, bias: bool = False, groups: int = 1
) -> ConvSpec | LinearSpec:
    """A 1x1 conv (or a Linear, when replacing a Linear) between factors."""
    if isinstance(layer, nn.Linear):
        return LinearSpec(in_ch, out_ch, bias)
    return ConvSpec(in_ch, out_ch, groups=groups, bias=bias)


def as_layer_weight(spec: ConvSpec | LinearSpec, weight: torch.Tensor) -> torch.Tensor:
    """Reshape a 4-D factor to what ``spec`` builds (2-D for a Linear)."""
    return weight.reshape(spec.out_features, spec.in_features) if isinstance(spec, LinearSpec) else weight


def same_geometry(layer: nn.Conv2d, in_ch: int, out_ch: int, *, groups: int = 1) -> ConvSpec:
    """A conv with ``layer``'s kernel, stride, padding, dilation and padding mode."""
    return ConvSpec(
        in_ch,
        out_ch,
        tuple(layer.kernel_size),
        tuple(layer.stride),
        layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
        tuple(layer.dilation),
        groups,
        False,
        layer.padding_mode,
    )


def split_geometry(layer: nn.Conv2d, in_ch: int, mid_ch: int, out_ch: int) -> tuple[ConvSpec, ConvSpec]:
    """A ``k_h x 1`` conv then a ``1 x k_w`` conv that together cover ``layer``'s geometry exactly."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    pad = layer.padding
    vertical_pad = pad if isinstance(pad, str) else (pad[0], 0)
    horizontal_pad = pad if isinstance(pad, str) else (0, pad[1])
    mode = layer.padding_mode
    vertical = ConvSpec(in_ch, mid_ch, (kh, 1), (sh, 1), vertical_pad, (dh, 1), 1, False, mode)
    horizontal = ConvSpec(mid_ch, out_ch, (1, kw), (1, sw), horizontal_pad, (1, dw), 1, False, mode)
    return vertical, horizontal
