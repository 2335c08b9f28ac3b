"""Linear-algebra helpers shared by the techniques: factorizations and calibration statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.techniques.cache import Factors


def work_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is factorized in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def svd(matrix: torch.Tensor) -> Factors:
    """Thin SVD ``matrix = u @ diag(s) @ vh`` (batched over leading dims), singular values descending."""
    u, s, vh = torch.linalg.svd(matrix.to(work_dtype(matrix)), full_matrices=False)
    return {"u": u, "s": s, "vh": vh}


def split_svd(factors: Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` the rank-``rank`` truncation; sqrt(s) goes to each side."""
    root = factors["s"][..., :rank].sqrt()
    left = factors["u"][..., :rank] * root[..., None, :]
    right = root[..., :, None] * factors["vh"][..., :rank, :]
    return left, right


def top_eigenvectors(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix (batched), as columns sorted by descending eigenvalue."""
    _, vectors = torch.linalg.eigh(gram.to(torch.float64))
    return vectors.flip(-1)


def padded_input(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``layer`` pads it, so a conv with padding 0 gives ``layer``'s output."""
    if layer.padding == "valid":
        return x
    if layer.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        ph, pw = layer.padding
        pads = [pw, pw, ph, ph]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pads, mode=mode)


def output_gram(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per group, ``Y Y^T`` of the layer's outputs without bias: shape ``(groups, N/g, N/g)``."""
    weight = layer.weight.detach()
    x = x.to(weight.dtype)
    if isinstance(layer, nn.Linear):
        y = F.linear(x, weight).reshape(-1, layer.out_features).T
        return (y @ y.T)[None]
    y = layer._conv_forward(x, weight, None)
    groups = layer.groups
    y = y.transpose(0, 1).reshape(groups, layer.out_channels // groups, -1)
    return y @ y.transpose(1, 2)


def input_channel_gram(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Uncentred second moment of the input channels, ``(C, C)``."""
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    z = x.reshape(-1, channels) if isinstance(layer, nn.Linear) else x.transpose(0, 1).reshape(channels, -1).T
    z = z.to(layer.weight.dtype)
    return z.T @ z


def column_patch_gram(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per group, the gram of the ``(C/g * k_h)``-long vertical patches a ``k_h x 1`` conv sees."""
    (kh, _), (sh, _), (dh, _) = layer.kernel_size, layer.stride, layer.dilation
    x = padded_input(layer, x.to(layer.weight.dtype))
    patches = F.unfold(x, (kh, 1), dilation=(dh, 1), stride=(sh, 1))  # (B, C*kh, L)
    groups = layer.groups
    patches = patches.transpose(0, 1).reshape(groups, patches.shape[1] // groups, -1)
    return patches @ patches.transpose(1, 2)
