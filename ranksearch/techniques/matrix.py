"""Techniques that factorize a reshaping of the weight as a matrix: keep, svd, grouped_svd, depthwise_separable."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ranksearch.errors import CompressionError
from ranksearch.techniques import register_technique
from ranksearch.techniques.base import Technique, Weights, bias_of, conv_weight, pointwise, same_geometry
from ranksearch.techniques.cache import FactorCache
from ranksearch.techniques.linalg import output_gram, split_svd, svd, top_eigenvectors, work_dtype
from ranksearch.techniques.spec import ConvSpec, LinearSpec, Plan, spec_of


@register_technique
class Keep(Technique):
    """The layer unchanged (its weights copied)."""

    name = "keep"
    summary = "unchanged"
    rank_names = ()

    def unsupported_reason(self, layer: nn.Module) -> str | None:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            return None
        return f"only Conv2d and Linear layers are supported, not {type(layer).__name__}"

    def full_ranks(self, layer, options, prefix):
        return ()

    def plan(self, layer, ranks, options):
        return Plan([spec_of(layer)], ranks)

    def decompose(self, layer, plan, options, cache, calib=None):
        return [(layer.weight.detach(), bias_of(layer))]


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


@register_technique
class ChannelSVD(Technique):
    """Weight SVD / channel decomposition: ``k x k`` conv C->r then 1x1 conv r->N (per group)."""

    name = "svd"
    summary = "k x k conv C->r, then 1x1 conv r->N"
    data_aware_capable = True

    def full_ranks(self, layer, options, prefix):
        weight = conv_weight(layer)
        n, c_per_group, kh, kw = weight.shape
        return (min(n // _groups(layer), c_per_group * kh * kw),)

    def plan(self, layer, ranks, options):
        (r,) = ranks
        g = _groups(layer)
        if isinstance(layer, nn.Linear):
            first: ConvSpec | LinearSpec = LinearSpec(layer.in_features, r)
        else:
            first = same_geometry(layer, layer.in_channels, g * r, groups=g)
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        return Plan([first, pointwise(g * r, out, layer, bias=layer.bias is not None, groups=g)], ranks)

    def decompose(self, layer, plan, options, cache: FactorCache, calib=None) -> Weights:
        (r,) = plan.ranks
        weight = conv_weight(layer)
        n, cg, kh, kw = weight.shape
        g = _groups(layer)
        matrix = weight.reshape(g, n // g, cg * kh * kw)
        if calib is None:
            left, right = split_svd(cache("svd", lambda: svd(matrix)), r)
        else:
            # Output approximation: project W onto the leading principal directions of its outputs.
            basis = cache("output-pca", lambda: {"p": top_eigenvectors(output_gram(layer, calib))})["p"]
            left = basis[..., :r].to(work_dtype(weight))
            right = left.transpose(1, 2) @ matrix.to(left.dtype)
        first = right.reshape(g * r, cg, kh, kw)
        second = left.reshape(n, r, 1, 1)
        return [(first, None), (second, bias_of(layer))]


@register_technique
class GroupedSVD(Technique):
    """Structured low rank: input channels split into groups, each with its own rank-r factorization."""

    name = "grouped_svd"
    summary = "grouped k x k conv C->g*r (g groups), then 1x1 conv g*r->N"
    default_options: Mapping[str, object] = {"groups": 2}

    def unsupported_reason(self, layer):
        if not isinstance(layer, nn.Conv2d):
            return "grouped_svd applies to Conv2d only (use svd for Linear)"
        if layer.groups != 1:
            return "grouped_svd needs an ungrouped conv (groups=1)"
        return None

    def full_ranks(self, layer, options, prefix):
        g = int(options["groups"])
        if g < 1 or layer.in_channels % g:
            raise CompressionError(f"groups={g} must divide in_channels={layer.in_channels}")
        kh, kw = layer.kernel_size
        return (min(layer.out_channels, layer.in_channels // g * kh * kw),)

    def plan(self, layer, ranks, options):
        (r,) = ranks
        g = int(options["groups"])
        first = same_geometry(layer, layer.in_channels, g * r, groups=g)
        return Plan([first, pointwise(g * r, layer.out_channels, layer, bias=layer.bias is not None)], ranks)

    def decompose(self, layer, plan, options, cache, calib=None):
        (r,) = plan.ranks
        g = int(options["groups"])
        weight = layer.weight.detach()
        n, c, kh, kw = weight.shape
        blocks = weight.reshape(n, g, c // g * kh * kw).transpose(0, 1)  # (g, N, C/g*k*k)
        left, right = split_svd(cache(f"svd-g{g}", lambda: svd(blocks)), r)
        first = right.reshape(g * r, c // g, kh, kw)
        second = left.transpose(0, 1).reshape(n, g * r, 1, 1)
        return [(first, None), (second, bias_of(layer))]


@register_technique
class DepthwiseSeparable(Technique):
    """Network decoupling: depthwise k x k with channel multiplier r, then 1x1 C*r->N."""

    name = "depthwise_separable"
    summary = "depthwise k x k conv (multiplier r), then 1x1 conv C*r->N; exact at r = k*k"
    rank_is_multiplier = True

    def unsupported_reason(self, layer):
        if not isinstance(layer, nn.Conv2d):
            return "depthwise_separable applies to Conv2d only"
        if layer.groups != 1:
            return "depthwise_separable needs an ungrouped conv (groups=1)"
        if tuple(layer.kernel_size) == (1, 1):
            return "a 1x1 conv has no spatial kernel to separate"
        return None

    def full_ranks(self, layer, options, prefix):
        kh, kw = layer.kernel_size
        return (min(layer.out_channels, kh * kw),)

    def plan(self, layer, ranks, options):
        (r,) = ranks
        c = layer.in_channels
        depthwise = same_geometry(layer, c, c * r, groups=c)
        return Plan([depthwise, pointwise(c * r, layer.out_channels, layer, bias=layer.bias is not None)], ranks)

    def decompose(self, layer, plan, options, cache, calib=None):
        (r,) = plan.ranks
        weight = layer.weight.detach()
        n, c, kh, kw = weight.shape
        per_channel = weight.reshape(n, c, kh * kw).transpose(0, 1)  # (C, N, k*k)
        left, right = split_svd(cache("svd-per-channel", lambda: svd(per_channel)), r)
        first = right.reshape(c * r, 1, kh, kw)
        second = left.transpose(0, 1).reshape(n, c * r, 1, 1)
        return [(first, None), (second, bias_of(layer))]
