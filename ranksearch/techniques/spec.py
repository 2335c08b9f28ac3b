"""Shape-only descriptions of the layers a technique builds: one source for cost and for modules.

A technique describes its replacement as a list of :class:`ConvSpec` / :class:`LinearSpec`.
The cost model (params, MACs) is computed from these specs alone, and the module is built
from the same specs plus weights, so the two can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import skip_init

M = TypeVar("M", bound=nn.Module)

Pair = tuple[int, int]


@dataclass(frozen=True)
class ConvSpec:
    """One ``nn.Conv2d`` of a replacement; ``padding`` is a pair or ``"same"``/``"valid"``."""

    in_channels: int
    out_channels: int
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair | str = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"

    @property
    def params(self) -> int:
        weight = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return weight + (self.out_channels if self.bias else 0)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape for an input shape ``(..., C, H, W)``."""
        *lead, _, h, w = input_shape
        if self.padding == "same":
            return (*lead, self.out_channels, h, w)
        pad = (0, 0) if self.padding == "valid" else self.padding
        size = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), pad, self.dilation, self.kernel_size, self.stride)
        ]
        return (*lead, self.out_channels, *size)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates for one forward pass (bias additions not counted)."""
        out = self.output_shape(input_shape)
        positions = math.prod(out[:-3]) * out[-2] * out[-1]
        return positions * (self.params - (self.out_channels if self.bias else 0))

    def build(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Conv2d:
        """The conv, holding ``weight``/``bias`` (default initialisation when ``weight`` is None)."""
        conv = _construct(
            nn.Conv2d,
            weight,
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
        )
        _assign(conv, weight, bias)
        return conv


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear`` of a replacement."""

    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*input_shape[:-1], self.out_features)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        return math.prod(input_shape[:-1]) * self.in_features * self.out_features

    def build(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Linear:
        """The Linear, holding ``weight``/``bias`` (default initialisation when ``weight`` is None)."""
        linear = _construct(nn.Linear, weight, self.in_features, self.out_features, bias=self.bias)
        _assign(linear, weight, bias)
        return linear


LayerSpec = ConvSpec | LinearSpec


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates of a layer or a replacement."""

    params: int
    macs: int

    def __iter__(self):
        return iter((self.params, self.macs))


@dataclass
class Plan:
    """What a technique will build for one layer at resolved ranks."""

    specs: list[LayerSpec]
    ranks: tuple[int, ...]
    notes: dict[str, object] = field(default_factory=dict)

    def cost(self, input_shape: tuple[int, ...]) -> Cost:
        """Params and MACs of all layers for one pass over ``input_shape``."""
        params = macs = 0
        shape = tuple(input_shape)
        for spec in self.specs:
            params += spec.params
            macs += spec.macs(shape)
            shape = spec.output_shape(shape)
        return Cost(params, macs)


def spec_of(layer: nn.Module) -> LayerSpec:
    """The spec that describes an existing dense layer."""
    if isinstance(layer, nn.Linear):
        return LinearSpec(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, nn.Conv2d):
        return ConvSpec(
            layer.in_channels,
            layer.out_channels,
            tuple(layer.kernel_size),
            tuple(layer.stride),
            layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            tuple(layer.dilation),
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
        )
    raise TypeError(f"no spec for {type(layer).__name__}")


def _construct(cls: type[M], weight: torch.Tensor | None, *args: object, **kwargs: object) -> M:
    """A fresh module; its default initialisation is skipped when ``weight`` will overwrite it."""
    if weight is None:
        return cls(*args, **kwargs)
    return skip_init(cls, *args, device=weight.device, dtype=weight.dtype, **kwargs)


def _assign(module: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if weight is None:
        return
    with torch.no_grad():
        if tuple(weight.shape) != tuple(module.weight.shape):
            raise RuntimeError(f"weight shape {tuple(weight.shape)} != {tuple(module.weight.shape)}")
        module.weight.copy_(weight)
        if module.bias is not None:
            if bias is None:
                module.bias.zero_()
            else:
                module.bias.copy_(bias)
        elif bias is not None:
            raise RuntimeError("a bias was given for a layer built without one")
