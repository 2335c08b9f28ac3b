"""Static int8 quantization of one layer (or a factorized chain of layers) with real int8 CPU kernels.

Weights are quantized per output channel, symmetric, to qint8; activations to quint8 with scales set
from calibration inputs. The result runs on torch.ao's quantized modules (x86/fbgemm engine): the
input is quantized once, the layers run in int8, and the output is dequantized once, so the module
takes and returns float tensors and drops into a float model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
from torch import nn

from ranksearch.errors import CompressionError

_ENGINE = "x86"
_QCONV_PADDING_MODES = ("zeros", "reflect")  # what torch.ao.nn.quantized.Conv2d accepts


class Int8Module(nn.Module):
    """Float in, float out: quantize, int8 layers, dequantize. Built by :func:`quantize_int8`."""

    def __init__(self, quant: nnq.Quantize, layers: list[nn.Module], dequant: nnq.DeQuantize) -> None:
        super().__init__()
        self.quant = quant
        self.layers = nn.Sequential(*layers)
        self.dequant = dequant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 layers on ``x``; the output in ``x``'s memory format. The x86 quantized conv writes channels-last
        outputs: passed on as they are, they would send every float conv after this layer (its weights contiguous)
        down torch's slow path, a copy and an unblocked convolution each (measured: one int8 layer in a 28 px
        ResNet-18 doubled its latency, 3.4 to 8.0 ms, while timed alone it was faster than the float layer)."""
        out = self.dequant(self.layers(self.quant(x)))
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        # clone, not contiguous(): a 1x1 map in channels-last strides counts as contiguous and would be kept as is
        return out.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    # Quantized convs pickle only through their own state tuple (plain pickling loses the
    # nn.Module internals), so the layers are stored as (class, state) pairs and rebuilt on load.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        layers = [(type(m), m.__getstate__()) for m in self.layers]
        return {**state, "_modules": {**state["_modules"], "layers": layers}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        layers = []
        for cls, layer_state in state["_modules"]["layers"]:
            layer = cls.__new__(cls)
            nn.Module.__init__(layer)
            layer.__setstate__(layer_state)
            layers.append(layer)
        super().__setstate__({**state, "_modules": {**state["_modules"], "layers": nn.Sequential(*layers)}})


def int8_available() -> bool:
    """Whether this torch build and CPU provide the x86 (fbgemm) quantized engine."""
    return _ENGINE in torch.backends.quantized.supported_engines


def quantize_int8(module: nn.Module, calib_inputs: torch.Tensor) -> Int8Module:
    """An :class:`Int8Module` computing ``module`` with int8 kernels on CPU.

    ``module`` is a Conv2d, a Linear, or an nn.Sequential of those; ``calib_inputs`` is a batch of
    real inputs to it, used to set the activation scales.
    """
    if calib_inputs is None:
        raise CompressionError("int8 needs calibration inputs to set activation scales; pass calib_inputs")
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise CompressionError("int8 kernels run on CPU only; move the model to CPU")
    if not int8_available():
        raise CompressionError("int8 needs the x86 (fbgemm) quantized engine, which this CPU or torch build lacks")
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    if not layers:
        raise CompressionError("int8 cannot quantize an empty nn.Sequential")
    chain = nn.Sequential(tq.QuantStub(), *(m for layer in layers for m in _float_copy(layer)), tq.DeQuantStub())
    chain.eval().requires_grad_(False)
    previous_engine = torch.backends.quantized.engine
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated; its warnings are noise here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.backends.quantized.engine = _ENGINE
            chain.qconfig = tq.get_default_qconfig(_ENGINE)
            tq.prepare(chain, inplace=True)
            with torch.no_grad():
                chain(calib_inputs.detach().float().cpu())
            tq.convert(chain, inplace=True)
        finally:
            torch.backends.quantized.engine = previous_engine
    return Int8Module(chain[0], list(chain[1:-1]), chain[-1]).eval()


def _float_copy(layer: nn.Module) -> list[nn.Module]:
    """``layer`` as plain float32 modules that eager-mode quantization converts."""
    if isinstance(layer, nn.Linear):
        copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        _copy_weights(layer, copy)
        return [copy]
    if not isinstance(layer, nn.Conv2d):
        raise CompressionError(f"int8 supports only Conv2d and Linear layers, not {type(layer).__name__}")
    if layer.padding_mode not in _QCONV_PADDING_MODES:
        supported = " and ".join(repr(m) for m in _QCONV_PADDING_MODES)
        raise CompressionError(
            f"int8 does not support padding_mode={layer.padding_mode!r} (quantized Conv2d supports {supported})"
        )
    pad: nn.Module | None = None
    padding, padding_mode = layer.padding, layer.padding_mode
    if isinstance(padding, str):  # 'valid' or 'same'; torch puts the odd extra 'same' pixel right/bottom
        totals = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        padding = (totals[0] // 2, totals[1] // 2)
        if any(t % 2 for t in totals):  # asymmetric: pad explicitly (the quantized conv pads symmetrically)
            (th, tw), (ph, pw) = totals, padding
            pads = (pw, tw - pw, ph, th - ph)
            pad = nn.ZeroPad2d(pads) if padding_mode == "zeros" else nn.ReflectionPad2d(pads)
            padding, padding_mode = (0, 0), "zeros"
    copy = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=padding_mode,
    )
    _copy_weights(layer, copy)
    return [copy] if pad is None else [pad, copy]


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight.float())
        if src.bias is not None:
            dst.bias.copy_(src.bias.float())
