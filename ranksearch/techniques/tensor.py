"""Spatial and tensor factorizations: spatial_svd, tucker2, spatial_tucker2, cp."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ranksearch.errors import CompressionError
from ranksearch.techniques import register_technique
from ranksearch.techniques.base import (
    Technique,
    bias_of,
    conv_weight,
    pointwise,
    same_geometry,
    split_geometry,
)
from ranksearch.techniques.cache import FactorCache, Factors
from ranksearch.techniques.linalg import (
    column_patch_gram,
    input_channel_gram,
    output_gram,
    split_svd,
    svd,
    top_eigenvectors,
    work_dtype,
)
from ranksearch.techniques.spec import Plan


def _spatial_conv_reason(layer: nn.Module, name: str, *, grouped_ok: bool = False) -> str | None:
    if not isinstance(layer, nn.Conv2d):
        return f"{name} applies to Conv2d only"
    if layer.groups != 1 and not grouped_ok:
        return f"{name} needs an ungrouped conv (groups=1)"
    if layer.in_channels // layer.groups == 1:
        return "depthwise convolution has no channel redundancy to factorize"
    if tuple(layer.kernel_size) == (1, 1):
        return f"a 1x1 conv has no spatial kernel for {name} (use svd)"
    return None


def to_spatial_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C/g, kh, kw)`` -> per group ``(C/g * kh, N/g * kw)``, rows (c, i), columns (n, j)."""
    n, cg, kh, kw = weight.shape
    per_group = weight.reshape(groups, n // groups, cg, kh, kw)
    return per_group.permute(0, 2, 3, 1, 4).reshape(groups, cg * kh, n // groups * kw)


def from_spatial_factors(
    left: torch.Tensor, right: torch.Tensor, kh: int, kw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``left (g, C/g*kh, r)`` and ``right (g, r, N/g*kw)`` -> the ``kh x 1`` and ``1 x kw`` kernels."""
    g, rows, r = left.shape
    vertical = left.transpose(1, 2).reshape(g * r, rows // kh, kh, 1)
    out_per_group = right.shape[2] // kw
    horizontal = right.reshape(g, r, out_per_group, kw).permute(0, 2, 1, 3).reshape(g * out_per_group, r, 1, kw)
    return vertical, horizontal


@register_technique
class SpatialSVD(Technique):
    """Jaderberg et al. 2014: ``k_h x 1`` conv C->r then ``1 x k_w`` conv r->N."""

    name = "spatial_svd"
    summary = "k x 1 conv C->r, then 1 x k conv r->N"
    data_aware_capable = True

    def unsupported_reason(self, layer):
        return _spatial_conv_reason(layer, self.name, grouped_ok=True)

    def full_ranks(self, layer, options, prefix):
        kh, kw = layer.kernel_size
        g = layer.groups
        return (min(layer.in_channels // g * kh, layer.out_channels // g * kw),)

    def plan(self, layer, ranks, options):
        (r,) = ranks
        g = layer.groups
        vertical, horizontal = split_geometry(layer, layer.in_channels, g * r, layer.out_channels)
        vertical = replace(vertical, groups=g)
        horizontal = replace(horizontal, groups=g, bias=layer.bias is not None)
        return Plan([vertical, horizontal], ranks)

    def decompose(self, layer, plan, options, cache, calib=None):
        (r,) = plan.ranks
        kh, kw = layer.kernel_size
        matrix = to_spatial_matrix(layer.weight.detach(), layer.groups)
        if calib is None:
            left, right = split_svd(cache("svd", lambda: svd(matrix)), r)
        else:
            # Output approximation: keep the directions of M that matter under the patch statistics.
            def whitened() -> Factors:
                gram = column_patch_gram(layer, calib).to(torch.float64)
                m = matrix.to(torch.float64)
                return {"v": top_eigenvectors(m.transpose(1, 2) @ gram @ m)}

            basis = cache("output-pca", whitened)["v"][..., :r].to(work_dtype(matrix))
            left, right = matrix.to(basis.dtype) @ basis, basis.transpose(1, 2)
        vertical, horizontal = from_spatial_factors(left, right, kh, kw)
        return [(vertical, None), (horizontal, bias_of(layer))]


def _hosvd(weight: torch.Tensor) -> Factors:
    """Full HOSVD over the output and input modes, and the full core (truncations are slices)."""
    w = weight.to(work_dtype(weight))
    n, c = w.shape[:2]
    u_out = _mode_basis(w.reshape(n, -1))
    u_in = _mode_basis(w.transpose(0, 1).reshape(c, -1))
    return {"u_out": u_out, "u_in": u_in, "core": _core(w, u_out, u_in)}


def _mode_basis(unfolding: torch.Tensor) -> torch.Tensor:
    """A complete orthonormal basis of the unfolding's column space, leading directions first."""
    return top_eigenvectors(unfolding @ unfolding.T).to(unfolding.dtype)


def _core(weight: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ncij,nr,cs->rsij", weight.to(u_out.dtype), u_out, u_in)


def _hooi(weight: torch.Tensor, r_out: int, r_in: int, iterations: int, start: Factors) -> Factors:
    """Higher-order orthogonal iteration from the truncated HOSVD."""
    w = weight.to(start["u_out"].dtype)
    n, c = w.shape[:2]
    u_out, u_in = start["u_out"][:, :r_out], start["u_in"][:, :r_in]
    for _ in range(iterations):
        proj_in = torch.einsum("ncij,cs->nsij", w, u_in).reshape(n, -1)
        u_out = _mode_basis(proj_in)[:, :r_out]
        proj_out = torch.einsum("ncij,nr->crij", w, u_out).reshape(c, -1)
        u_in = _mode_basis(proj_out)[:, :r_in]
    return {"u_out": u_out, "u_in": u_in, "core": _core(w, u_out, u_in)}


def tucker_factors(
    layer: nn.Module,
    r_in: int,
    r_out: int,
    options: Mapping[str, object],
    cache: FactorCache,
    calib: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in (C, r_in), core (r_out, r_in, kh, kw), u_out (N, r_out))`` of a Tucker-2 decomposition."""
    weight = conv_weight(layer)
    if calib is not None:

        def data_aware() -> Factors:
            u_out = top_eigenvectors(output_gram(layer, calib)[0]).to(work_dtype(weight))
            u_in = top_eigenvectors(input_channel_gram(layer, calib)).to(work_dtype(weight))
            return {"u_out": u_out, "u_in": u_in, "core": _core(weight, u_out, u_in)}

        full = cache("output-pca", data_aware)
    else:
        full = cache("hosvd", lambda: _hosvd(weight))
    iterations = int(options.get("hooi_iterations", 0))
    if iterations > 0 and calib is None:
        full = cache(f"hooi-{r_out}-{r_in}-{iterations}", lambda: _hooi(weight, r_out, r_in, iterations, full))
        return full["u_in"], full["core"], full["u_out"]
    return full["u_in"][:, :r_in], full["core"][:r_out, :r_in], full["u_out"][:, :r_out]


def _tucker_reason(layer: nn.Module, name: str) -> str | None:
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
        return f"{name} applies to Conv2d and Linear only"
    if layer.groups != 1:
        return f"{name} needs an ungrouped conv (groups=1)"
    return None


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


@register_technique
class Tucker2(Technique):
    """Kim et al. 2016: 1x1 C->r_in, k x k r_in->r_out, 1x1 r_out->N (HOSVD, optional HOOI)."""

    name = "tucker2"
    summary = "1x1 conv C->r_in, k x k conv r_in->r_out, 1x1 conv r_out->N"
    rank_names = ("in_rank", "out_rank")
    data_aware_capable = True
    default_options: Mapping[str, object] = {"hooi_iterations": 0}

    def unsupported_reason(self, layer):
        return _tucker_reason(layer, self.name)

    def full_ranks(self, layer, options, prefix):
        return _channels(layer)

    def plan(self, layer, ranks, options):
        r_in, r_out = ranks
        c, n = _channels(layer)
        linear = isinstance(layer, nn.Linear)
        middle = pointwise(r_in, r_out, layer) if linear else same_geometry(layer, r_in, r_out)
        return Plan([pointwise(c, r_in, layer), middle, pointwise(r_out, n, layer, bias=layer.bias is not None)], ranks)

    def decompose(self, layer, plan, options, cache, calib=None):
        r_in, r_out = plan.ranks
        u_in, core, u_out = tucker_factors(layer, r_in, r_out, options, cache, calib)
        return [(u_in.T[:, :, None, None], None), (core, None), (u_out[:, :, None, None], bias_of(layer))]


@register_technique
class SpatialTucker2(Technique):
    """Tucker-2 whose core is split ``k_h x 1`` / ``1 x k_w``: filter and spatial low rank combined."""

    name = "spatial_tucker2"
    summary = "1x1 C->r_in, k x 1 r_in->r_s, 1 x k r_s->r_out, 1x1 r_out->N"
    rank_names = ("in_rank", "out_rank", "spatial_rank")
    default_options: Mapping[str, object] = {"hooi_iterations": 0}

    def unsupported_reason(self, layer):
        return _spatial_conv_reason(layer, self.name)

    def full_ranks(self, layer, options, prefix):
        kh, kw = layer.kernel_size
        r_in = prefix[0] if len(prefix) > 0 else layer.in_channels
        r_out = prefix[1] if len(prefix) > 1 else layer.out_channels
        return (layer.in_channels, layer.out_channels, min(r_in * kh, r_out * kw))

    def plan(self, layer, ranks, options):
        r_in, r_out, r_s = ranks
        vertical, horizontal = split_geometry(layer, r_in, r_s, r_out)
        c, n = layer.in_channels, layer.out_channels
        return Plan(
            [pointwise(c, r_in, layer), vertical, horizontal, pointwise(r_out, n, layer, bias=layer.bias is not None)],
            ranks,
        )

    def decompose(self, layer, plan, options, cache, calib=None):
        r_in, r_out, r_s = plan.ranks
        kh, kw = layer.kernel_size
        u_in, core, u_out = tucker_factors(layer, r_in, r_out, options, cache, None)
        matrix = to_spatial_matrix(core, 1)
        left, right = split_svd(
            cache(f"core-svd-{r_in}-{r_out}-{options['hooi_iterations']}", lambda: svd(matrix)), r_s
        )
        vertical, horizontal = from_spatial_factors(left, right, kh, kw)
        return [
            (u_in.T[:, :, None, None], None),
            (vertical, None),
            (horizontal, None),
            (u_out[:, :, None, None], bias_of(layer)),
        ]


@register_technique
class CP(Technique):
    """Lebedev et al. 2015: 1x1 C->R, depthwise k_h x 1, depthwise 1 x k_w, 1x1 R->N (CP-ALS).

    A rank fraction is relative to the break-even rank, where the four layers hold as many
    parameters as the dense conv; CP is not exact at any rank in general.
    """

    name = "cp"
    summary = "1x1 C->R, depthwise k x 1, depthwise 1 x k, 1x1 R->N"
    exact_at_full_rank = False
    default_options: Mapping[str, object] = {"n_iter_max": 100, "tol": 1e-6, "seed": 0}

    def unsupported_reason(self, layer):
        return _spatial_conv_reason(layer, self.name)

    def full_ranks(self, layer, options, prefix):
        n, c, kh, kw = layer.weight.shape
        return (max(1, n * c * kh * kw // (n + c + kh + kw)),)

    def plan(self, layer, ranks, options):
        (r,) = ranks
        vertical, horizontal = split_geometry(layer, r, r, r)
        vertical, horizontal = replace(vertical, groups=r), replace(horizontal, groups=r)
        c, n = layer.in_channels, layer.out_channels
        return Plan(
            [pointwise(c, r, layer), vertical, horizontal, pointwise(r, n, layer, bias=layer.bias is not None)], ranks
        )

    def decompose(self, layer, plan, options, cache, calib=None):
        (r,) = plan.ranks
        tag = f"cp-{r}-{options['n_iter_max']}-{options['tol']}-{options['seed']}"
        f = cache(tag, lambda: _parafac(layer.weight.detach(), r, options))
        return [
            (f["c"].T[:, :, None, None], None),
            (f["h"].T[:, None, :, None], None),
            (f["w"].T[:, None, None, :], None),
            (f["n"][:, :, None, None], bias_of(layer)),
        ]


_MTTKRP = ("ncij,cr,ir,jr->nr", "ncij,nr,ir,jr->cr", "ncij,nr,cr,jr->ir", "ncij,nr,cr,ir->jr")


def _parafac(weight: torch.Tensor, rank: int, options: Mapping[str, object]) -> Factors:
    """CP-ALS of the 4-way kernel, SVD-initialised; the weights are absorbed into the output factor.

    Written in torch because the MTTKRPs are einsum contractions that never form Khatri-Rao
    products: measured 17x (float64) to 33x (float32) faster than tensorly's ``parafac`` on a
    256x256x3x3 kernel at rank 150, at the same error (see ``tests/test_techniques.py``).
    """
    x = weight.detach().to(work_dtype(weight))
    generator = torch.Generator(device="cpu").manual_seed(int(options["seed"]))
    factors = []
    for mode, size in enumerate(x.shape):
        u = torch.linalg.svd(x.movedim(mode, 0).reshape(size, -1), full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(size, rank - u.shape[1], generator=generator, dtype=x.dtype).to(x.device)
            u = torch.cat([u, extra / size**0.5], dim=1)
        factors.append(u)
    grams = [f.T @ f for f in factors]
    norm = x.norm()
    scale = torch.ones(rank, dtype=x.dtype, device=x.device)
    previous = None
    for _ in range(int(options["n_iter_max"])):
        for mode in range(4):
            others = [factors[k] for k in range(4) if k != mode]
            gram = torch.ones_like(grams[0])
            for k in range(4):
                if k != mode:
                    gram = gram * grams[k]
            mttkrp = torch.einsum(_MTTKRP[mode], x, *others)
            updated = torch.linalg.lstsq(gram, mttkrp.T).solution.T
            if mode == 3:
                inner = (mttkrp * updated).sum()
            scale = updated.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)
            factors[mode] = updated / scale
            grams[mode] = factors[mode].T @ factors[mode]
        model_norm_sq = (grams[0] * grams[1] * grams[2] * grams[3] * torch.outer(scale, scale)).sum()
        error = float((norm**2 - 2 * inner + model_norm_sq).clamp_min(0).sqrt() / norm)
        if not math.isfinite(error):
            raise CompressionError(f"CP-ALS diverged at rank {rank}")
        if previous is not None and abs(previous - error) < float(options["tol"]):
            break
        previous = error
    out, c, h, w = factors
    return {"n": out * scale, "c": c, "h": h, "w": w}
