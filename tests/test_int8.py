import copy
import io

import pytest
import torch
from torch import nn
from torch.ao.nn import quantized as nnq

from ranksearch.errors import CompressionError
from ranksearch.techniques.int8 import Int8Module, int8_available, quantize_int8

pytestmark = pytest.mark.skipif(not int8_available(), reason="no x86/fbgemm quantized engine on this CPU")


def _inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Post-ReLU-like activations, as a layer inside a CNN sees them."""
    return torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + 0.2)


def _rel_error(module: nn.Module, qmodule: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = module(x.to(next(module.parameters()).dtype)).float()
        return ((qmodule(x) - ref).norm() / ref.norm()).item()


class Factorized(nn.Sequential):
    pass


CONVS = {
    "stride2_pad1": nn.Conv2d(16, 32, 3, stride=2, padding=1),
    "dilation2_nobias": nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False),
    "groups4": nn.Conv2d(16, 32, 3, padding=1, groups=4),
    "depthwise": nn.Conv2d(16, 16, 3, padding=1, groups=16),
    "kernel_3x1": nn.Conv2d(16, 32, (3, 1), padding=(1, 0)),
    "kernel_1x5_same": nn.Conv2d(16, 32, (1, 5), padding="same"),
    "kernel_4_same_asymmetric": nn.Conv2d(16, 32, 4, padding="same"),
    "reflect": nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect"),
    "float64": nn.Conv2d(16, 32, 3, padding=1).double(),
    "factorized": Factorized(nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 32, 1)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the float reference's warning
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_close_to_float(name: str) -> None:
    conv = CONVS[name].eval()
    calib = _inputs((16, 16, 14, 14)).to(memory_format=torch.channels_last)
    qconv = quantize_int8(conv, calib)
    assert _rel_error(conv, qconv, _inputs((4, 16, 14, 14), seed=1)) < 0.05


@pytest.mark.parametrize("size", [14, 1], ids=["14x14", "1x1"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_the_output_keeps_the_input_memory_format(size: int, layout: torch.memory_format) -> None:
    """The quantized conv writes channels-last: handed on as it is, the float convs after it fall to torch's slow
    path (one int8 layer doubled a 28 px ResNet-18's latency). The output has the input's strides, even for a 1x1
    map (where channels-last strides also count as contiguous)."""
    qconv = quantize_int8(nn.Conv2d(16, 32, 3, padding=1).eval(), _inputs((8, 16, 14, 14)))
    x = _inputs((2, 16, size, size)).contiguous(memory_format=layout)
    with torch.no_grad():
        out = qconv(x)
    expected = torch.empty(out.shape).contiguous(memory_format=layout if size > 1 else torch.contiguous_format)
    assert out.stride() == expected.stride()


def test_linear_close_to_float() -> None:
    linear = nn.Linear(64, 10).eval()
    qlinear = quantize_int8(linear, _inputs((64, 64)))
    assert isinstance(qlinear.layers[0], nnq.Linear)
    assert _rel_error(linear, qlinear, _inputs((8, 64), seed=1)) < 0.05


def test_really_int8() -> None:
    factorized = CONVS["factorized"].eval()
    qmodule = quantize_int8(factorized, _inputs((8, 16, 14, 14)))
    assert isinstance(qmodule, Int8Module)
    assert [type(m) for m in qmodule.layers] == [nnq.Conv2d] * 3  # quantized end to end, no dequantize between
    assert isinstance(qmodule.quant, nnq.Quantize) and isinstance(qmodule.dequant, nnq.DeQuantize)
    for conv in qmodule.layers:
        weight = conv.weight()
        assert weight.dtype == torch.qint8
        assert weight.q_per_channel_zero_points().eq(0).all()  # per-channel symmetric
    assert not any(p.requires_grad for p in qmodule.parameters())
    assert not qmodule(_inputs((1, 16, 14, 14))).requires_grad
    assert "float" not in repr(qmodule).lower() and len(repr(qmodule)) < 1000


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of quantized tensors
def test_deepcopy_and_save_load_roundtrip() -> None:
    qmodule = quantize_int8(CONVS["factorized"].eval(), _inputs((8, 16, 14, 14)))
    x = _inputs((2, 16, 14, 14), seed=1)
    buffer = io.BytesIO()
    torch.save(qmodule, buffer)
    buffer.seek(0)
    for restored in (copy.deepcopy(qmodule), torch.load(buffer, weights_only=False)):
        assert isinstance(restored, Int8Module)
        assert torch.equal(restored(x), qmodule(x))


def test_missing_calibration_inputs() -> None:
    with pytest.raises(CompressionError, match="calib_inputs"):
        quantize_int8(nn.Conv2d(3, 3, 3), None)


@pytest.mark.parametrize("padding_mode", ["replicate", "circular"])
def test_unsupported_padding_mode(padding_mode: str) -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode=padding_mode)
    with pytest.raises(CompressionError, match=f"int8 does not support padding_mode='{padding_mode}'"):
        quantize_int8(conv, _inputs((1, 3, 8, 8)))


def test_unsupported_layer() -> None:
    with pytest.raises(CompressionError, match="BatchNorm2d"):
        quantize_int8(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)), _inputs((1, 3, 8, 8)))
