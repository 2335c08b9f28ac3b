"""CPU convolution backward passes around oneDNN's slow and broken kernels.

oneDNN computes the weight gradient of convolutions with tiny outputs (at most 2x2 pixels) or
single-channel inputs up to 20x slower than the forward pass (measured on a 2-core AVX2 CPU). Inside
:class:`CpuConvGrads`, such ``conv2d`` calls compute it as one matrix product over unfolded inputs instead.

And torch 2.14's CPU backward of a strided 1x1 convolution in channels-last memory with few input channels writes
out of bounds: a segmentation fault, or glibc's "free(): invalid next size" (8 -> 16 channels, stride 2, 56x56 or
112x112 maps, batch 16; 24 -> 16 channels or a 28x28 map survive). Tucker-2 at low rank on a ResNet downsample
layer at 224 px makes one, and fine-tuning it killed the search. Inside :class:`CpuConvGrads`, every strided 1x1
convolution runs as the stride-1 convolution of the subsampled input, which is the same function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CpuConvGrads"]


class CpuConvGrads(TorchFunctionMode):
    """Route CPU ``conv2d`` calls whose oneDNN backward is slow through :class:`_MatmulWeightGradConv2d`, and strided
    1x1 ones (whose backward can corrupt memory) through a stride-1 convolution of the subsampled input.

    Measured (batch 256, channels-last, 2 threads), forward + backward: 512->512 3x3 conv on a 1x1 map
    344 ms with oneDNN vs 41 ms here; 256->512 stride 2 onto 1x1: 98 vs 48 ms; 256->256 on 2x2: 70 vs
    56 ms; the 1-channel 7x7 stem: 62 vs 31 ms; but 64->64 on 7x7: 43 vs 85 ms, so only outputs of at
    most 4 pixels and single-channel inputs take this path.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = _ConvCall.of(*args, **kwargs)
            if call is not None and _matmul_beats_onednn(call):
                return _MatmulWeightGradConv2d.apply(call.x, call.weight, call.bias, call.stride, call.padding)
            if call is not None and _strided_pointwise(call):  # the pixels a 1x1 kernel visits, at stride 1
                step_h, step_w = call.stride
                return F.conv2d(call.x[:, :, ::step_h, ::step_w], call.weight, call.bias, groups=call.groups)
        return func(*args, **kwargs)


class _MatmulWeightGradConv2d(torch.autograd.Function):
    """conv2d whose weight gradient is one (out, N*L) @ (N*L, in*k*k) matrix product over unfolded inputs.

    A 1x1 input to a 1x1 output (a 3x3 conv on ResNet's last stage at 28x28) meets one kernel tap, so its
    forward and both gradients are (N, in) x (in, out) matrix products, skipping the 8 zero-padded taps.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        tap = _single_tap(x, weight, stride, padding)
        if tap is not None:  # a 1x1 map to a 1x1 output: a matrix product with one kernel tap
            # a copy, not a view of it: an in-place activation may follow (timm's squeeze-excitation convs)
            return F.linear(x.flatten(1), weight[:, :, tap[0], tap[1]], bias)[:, :, None, None].clone()
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        n, out = grad.shape[:2]
        tap = _single_tap(x, weight, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[0]:
            if tap is not None:
                grad_x = (grad.reshape(n, out) @ weight[:, :, tap[0], tap[1]]).view_as(x)
            else:
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1, [True, False, False]
                )[0]
        if ctx.needs_input_grad[1]:
            if tap is not None:
                grad_w = weight.new_zeros(weight.shape)
                grad_w[:, :, tap[0], tap[1]] = grad.reshape(n, out).t() @ x.reshape(n, -1)
            else:
                cols = F.unfold(x, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)
                grad_rows = grad.reshape(n, out, -1).transpose(0, 1).reshape(out, -1)
                grad_w = (grad_rows @ cols.transpose(1, 2).reshape(-1, cols.shape[1])).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _single_tap(
    x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int] | None:
    """The one kernel tap a 1x1 input meets when the output is 1x1 too, else None."""
    if x.shape[2:] != (1, 1):
        return None
    size = [(1 + 2 * p - k) // s + 1 for p, k, s in zip(padding, weight.shape[2:], stride)]
    if size != [1, 1] or not all(p < k for p, k in zip(padding, weight.shape[2:])):
        return None
    return padding[0], padding[1]


class _ConvCall(NamedTuple):
    """A CPU ``conv2d`` call on a 4-D input with numeric padding, its arguments in one form."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
    ) -> _ConvCall | None:
        """The call as ``F.conv2d`` takes it; None for one this module leaves alone (not CPU, not 4-D, padding
        named as a string, or nothing to differentiate)."""
        if x.dim() != 4 or x.device.type != "cpu" or isinstance(padding, str) or not torch.is_grad_enabled():
            return None
        if not (weight.requires_grad or x.requires_grad):
            return None
        return cls(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)


def _matmul_beats_onednn(call: _ConvCall) -> bool:
    """Whether :class:`_MatmulWeightGradConv2d` beats oneDNN: a trained ungrouped, undilated conv onto at most 4
    output pixels, or from a single-channel input."""
    if call.groups != 1 or call.dilation != (1, 1) or not call.weight.requires_grad:
        return False
    x, kernel = call.x, call.weight.shape[2:]
    out_h, out_w = ((x.shape[i + 2] + 2 * call.padding[i] - kernel[i]) // call.stride[i] + 1 for i in range(2))
    return out_h * out_w <= 4 or x.shape[1] == 1


def _strided_pointwise(call: _ConvCall) -> bool:
    """Whether ``call`` is a strided 1x1 conv without padding (whose channels-last backward can corrupt memory)."""
    return tuple(call.weight.shape[2:]) == (1, 1) and call.padding == (0, 0) and call.stride != (1, 1)


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])
