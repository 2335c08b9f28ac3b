"""Conformance suite: every registered technique, on every layer case, against the dense layer it replaces."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import require_tool
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ranksearch as rs
from ranksearch.techniques.cache import FactorStore

CONV_CASES = {
    "3x3": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    "stride2": dict(in_channels=16, out_channels=24, kernel_size=3, stride=2, padding=1),
    "pad0": dict(in_channels=16, out_channels=24, kernel_size=3, padding=0),
    "same": dict(in_channels=16, out_channels=24, kernel_size=3, padding="same"),
    "same_even_dilated": dict(in_channels=8, out_channels=12, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
    "dilation2": dict(in_channels=16, out_channels=24, kernel_size=3, padding=2, dilation=2),
    "k3x1": dict(in_channels=16, out_channels=24, kernel_size=(3, 1), padding=(1, 0)),
    "k1x5_stride": dict(in_channels=16, out_channels=24, kernel_size=(1, 5), stride=(1, 2), padding=(0, 2)),
    "nonsquare_stride": dict(in_channels=16, out_channels=24, kernel_size=3, stride=(2, 1), padding=1),
    "no_bias": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, bias=False),
    "groups2": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, groups=2),
    "reflect": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_stride": dict(
        in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, padding_mode="circular"
    ),
    "replicate": dict(in_channels=8, out_channels=12, kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate"),
    "pointwise": dict(in_channels=16, out_channels=24, kernel_size=1),
    "depthwise": dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=16),
}
CASES = [*CONV_CASES, "linear", "channels_last"]
TECHNIQUES = rs.list_techniques()


def make_layer(case: str) -> tuple[nn.Module, torch.Tensor]:
    """A float64 layer with trained-like (decaying spectrum) weights, and an input for it."""
    torch.manual_seed(0)
    if case == "linear":
        layer = nn.Linear(40, 24).double()
        x = torch.randn(5, 40, dtype=torch.float64)
    else:
        kwargs = CONV_CASES.get(case, CONV_CASES["3x3"])
        layer = nn.Conv2d(**kwargs).double()
        x = torch.randn(2, kwargs["in_channels"], 11, 10, dtype=torch.float64)
        if case == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return layer, x


def full_rank(technique: str, layer: nn.Module) -> tuple[int, ...] | None:
    t = rs.get_technique(technique)
    options = t.options({})
    if technique == "spatial_tucker2":
        return (*t.full_ranks(layer, options, ())[:2], 1.0)
    ranks = t.full_ranks(layer, options, ())
    return ranks if ranks else None


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def supported(technique: str, layer: nn.Module) -> bool:
    return rs.get_technique(technique).unsupported_reason(layer) is None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_full_rank_reproduces_dense_layer(technique: str, case: str) -> None:
    layer, x = make_layer(case)
    if not supported(technique, layer):
        with pytest.raises(rs.CompressionError, match=technique):
            rs.compress_layer(layer, technique, 1.0)
        return
    rank = full_rank(technique, layer)
    module = rs.compress_layer(layer, technique, rank)
    expected = layer(x)
    got = module(x)
    assert got.shape == expected.shape
    error = ((got - expected).norm() / expected.norm()).item()
    if rs.get_technique(technique).exact_at_full_rank:
        assert error <= 1e-5, f"{technique} on {case}: relative error {error:.2e}"
    else:
        assert error < 0.5, f"{technique} on {case}: relative error {error:.2e}"


def cost_cases() -> list[object]:
    """(technique, case, rank) for every technique on every layer case it supports (the unsupported ones are
    test_full_rank_reproduces_dense_layer's), at fractions 1.0, 0.5 and 0.2; ``keep`` takes no rank, and CP's
    full rank is a parameter-count bound whose ALS is slow: 0.5 and 0.2 check its counting."""
    cases = []
    for technique in TECHNIQUES:
        for case in CASES:
            if not supported(technique, make_layer(case)[0]):
                continue
            ranks = [None] if technique == "keep" else [0.5, 0.2] if technique == "cp" else [1.0, 0.5, 0.2]
            cases += [pytest.param(technique, case, rank, id=f"{technique}-{case}-{rank}") for rank in ranks]
    return cases


@pytest.mark.parametrize(("technique", "case", "rank"), cost_cases())
def test_cost_model_equals_counting(technique: str, case: str, rank: float | None) -> None:
    layer, x = make_layer(case)
    module = rs.compress_layer(layer, technique, rank, rank_multiple=4)
    params, macs = rs.layer_cost(layer, technique, rank, tuple(x.shape), rank_multiple=4)
    assert params == sum(p.numel() for p in module.parameters())
    assert macs == count_macs(module, x)


@pytest.mark.parametrize("case", ["3x3", "linear"])
def test_dense_cost_is_counted_too(case: str) -> None:
    layer, x = make_layer(case)
    report = rs.cost_report(layer, "keep", None, tuple(x.shape))
    assert report.dense == report.cost
    assert report.dense.macs == count_macs(layer, x)


def test_larger_replacement_is_flagged() -> None:
    layer = nn.Conv2d(16, 24, 3, padding=1)
    assert rs.cost_report(layer, "svd", 1.0, (16, 8, 8)).larger
    assert not rs.cost_report(layer, "svd", 0.25, (16, 8, 8)).larger


def low_rank_plus_noise(out_ch: int, in_ch: int, rank: int, noise: float = 0.02) -> torch.Tensor:
    torch.manual_seed(1)
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (out_ch, in_ch, 3, 3)]
    weight = torch.einsum("ar,br,cr,dr->abcd", *factors)
    return weight / weight.norm() + noise * torch.randn_like(weight) / weight.numel() ** 0.5


def test_cp_error_falls_with_rank() -> None:
    layer = nn.Conv2d(12, 16, 3, padding=1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(low_rank_plus_noise(16, 12, rank=6))
    x = torch.randn(2, 12, 8, 8, dtype=torch.float64)
    errors = []
    for rank in (1, 3, 6, 12):
        module = rs.compress_layer(layer, "cp", rank)
        errors.append(((module(x) - layer(x)).norm() / layer(x).norm()).item())
    assert all(lower > higher for lower, higher in itertools.pairwise(errors)), errors  # each rank step helps
    assert errors[-2] < 0.1, errors  # measured: 0.806, 0.530, 0.018 at the true rank 6, 0.016


def test_cp_als_matches_tensorly_parafac() -> None:
    require_tool("tensorly")
    from tensorly import decomposition

    weight = low_rank_plus_noise(16, 12, rank=6, noise=0.1)
    reference = decomposition.parafac(weight.numpy(), 6, init="svd", n_iter_max=100, tol=1e-6, random_state=0)
    reference_error = (torch.from_numpy(tensorly_to_tensor(reference)) - weight).norm() / weight.norm()
    layer = nn.Conv2d(12, 16, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    module = rs.compress_layer(layer, "cp", 6)
    ours = torch.einsum(
        "nr,rc,ri,rj->ncij",
        module[3].weight[:, :, 0, 0],
        module[0].weight[:, :, 0, 0],
        module[1].weight[:, 0, :, 0],
        module[2].weight[:, 0, 0, :],
    )
    error = (ours - weight).norm() / weight.norm()
    assert error <= reference_error * 1.05 + 1e-6, (error, reference_error)


def tensorly_to_tensor(cp: object):
    import tensorly

    return tensorly.cp_to_tensor(cp)


@pytest.mark.parametrize(
    ("technique", "rank", "reason"),
    [
        ("svd", 0, "at least 1"),
        ("svd", -3, "at least 1"),
        ("svd", 10_000, "above the full rank"),
        ("svd", 1.5, "must be in \\(0, 1\\]"),
        ("svd", "half", "int or a fraction"),
        ("tucker2", (4, 4, 4), "needs 1 or 2 values"),
        ("svd", None, "a rank is required"),
    ],
)
def test_bad_rank_is_a_one_line_value_error(technique: str, rank: object, reason: str) -> None:
    layer = nn.Conv2d(16, 24, 3)
    with pytest.raises(ValueError, match=reason) as info:
        rs.compress_layer(layer, technique, rank)
    message = str(info.value)
    assert "\n" not in message and technique in message and "Conv2d(16->24" in message


@pytest.mark.parametrize(
    ("technique", "layer", "reason"),
    [
        ("tucker2", nn.Conv2d(16, 24, 3, groups=2), "ungrouped"),
        ("depthwise_separable", nn.Linear(8, 8), "Conv2d only"),
        ("cp", nn.Conv2d(16, 24, 1), "1x1"),
        ("svd", nn.Conv2d(16, 16, 3, groups=16), "depthwise"),
        ("svd", nn.BatchNorm2d(4), "BatchNorm2d"),
        ("no_such_technique", nn.Conv2d(4, 4, 3), "unknown technique"),
    ],
)
def test_unsupported_layer_is_a_value_error(technique: str, layer: nn.Module, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        rs.compress_layer(layer, technique, 0.5, name="features.3")
    assert "\n" not in str(info.value) and technique in str(info.value)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        rs.compress_layer(nn.Conv2d(8, 8, 3), "svd", 0.5, groups=2)


def test_grouped_svd_groups_must_divide_channels() -> None:
    with pytest.raises(ValueError, match="must divide in_channels"):
        rs.compress_layer(nn.Conv2d(9, 8, 3), "grouped_svd", 0.5, groups=2)


@pytest.mark.parametrize(
    ("full", "fraction", "multiple", "expected"),
    [(64, 0.5, 8, 32), (64, 0.3, 8, 16), (64, 0.01, 8, 8), (100, 0.99, 8, 100), (6, 0.5, 8, 3), (64, 1.0, 8, 64)],
)
def test_fraction_rounding(full: int, fraction: float, multiple: int, expected: int) -> None:
    layer = nn.Linear(full, full)
    assert rs.get_technique("svd").resolve_ranks(layer, fraction, {}, multiple=multiple) == (expected,)


def test_int_rank_is_taken_as_given() -> None:
    layer = nn.Linear(64, 64)
    assert rs.get_technique("svd").resolve_ranks(layer, 5, {}, multiple=8) == (5,)


def test_lower_rank_is_a_slice_of_cached_factors(factor_store: FactorStore) -> None:
    layer, _ = make_layer("3x3")
    rs.compress_layer(layer, "svd", 8, rank_multiple=1)
    misses = factor_store.misses
    for rank in (4, 12, 16):
        rs.compress_layer(layer, "svd", rank, rank_multiple=1)
    assert factor_store.misses == misses
    assert factor_store.hits >= 3


def test_cache_survives_on_disk(tmp_path) -> None:
    layer, x = make_layer("3x3")
    first = FactorStore(directory=tmp_path / "disk", persist_after_s=0.0)
    expected = rs.compress_layer(layer, "tucker2", (8, 8), store=first)(x)
    second = FactorStore(directory=tmp_path / "disk", persist_after_s=0.0)
    got = rs.compress_layer(layer, "tucker2", (8, 8), store=second)(x)
    assert second.disk_hits == 1 and second.misses == 0
    torch.testing.assert_close(got, expected)


def test_changed_weights_miss_the_cache(factor_store: FactorStore) -> None:
    layer, x = make_layer("3x3")
    rs.compress_layer(layer, "svd", 1.0)
    with torch.no_grad():
        layer.weight.mul_(2)
    module = rs.compress_layer(layer, "svd", 1.0)
    assert (factor_store.misses, factor_store.hits) == (2, 0)
    torch.testing.assert_close(module(x), layer(x))


def test_hooi_refines_tucker2() -> None:
    layer = nn.Conv2d(16, 24, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(low_rank_plus_noise(24, 16, rank=12, noise=0.3))
    errors = []
    for iterations in (0, 1, 5):  # 0: the truncated HOSVD that HOOI starts from
        module = rs.compress_layer(layer, "tucker2", (6, 6), hooi_iterations=iterations)
        effective = module[2].weight[:, :, 0, 0] @ torch.einsum(
            "rsij,sc->rcij", module[1].weight, module[0].weight[:, :, 0, 0]
        ).flatten(1)
        errors.append((effective - layer.weight.flatten(1)).norm().item())
    assert errors[0] > errors[1] > errors[2], errors  # every iteration improves the fit
    assert errors[2] < 0.99 * errors[0], errors  # measured: 0.4918 after 5 iterations, 0.5095 before


@pytest.mark.parametrize("technique", [t for t in TECHNIQUES if t != "keep"])
def test_random_init_has_the_same_structure(technique: str) -> None:
    layer, x = make_layer("3x3")
    rank = 2 if technique != "spatial_tucker2" else (4, 4, 2)
    decomposed = rs.compress_layer(layer, technique, rank, rank_multiple=1)
    fresh = rs.compress_layer(layer, technique, rank, rank_multiple=1, init="random")
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in decomposed.parameters()]
    assert fresh(x).shape == layer(x).shape


@pytest.mark.parametrize("technique", [t for t in TECHNIQUES if rs.get_technique(t).data_aware_capable])
def test_data_aware_preserves_outputs_better(technique: str) -> None:
    torch.manual_seed(3)
    layer = nn.Conv2d(16, 24, 3, padding=1).double()
    mixing = torch.randn(16, 16, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)

    def inputs(n: int) -> torch.Tensor:
        return torch.einsum("dc,bchw->bdhw", mixing, torch.randn(n, 16, 10, 10, dtype=torch.float64))

    calib, held_out = inputs(32), inputs(16)
    rank = (4, 6) if technique == "tucker2" else 6
    plain = rs.compress_layer(layer, technique, rank, rank_multiple=1)
    aware = rs.compress_layer(layer, technique, rank, rank_multiple=1, data_aware=True, calib_inputs=calib)

    def error(m: nn.Module) -> float:
        return ((m(held_out) - layer(held_out)).norm() / layer(held_out).norm()).item()

    assert error(aware) < error(plain)
    full = full_rank(technique, layer)
    exact = rs.compress_layer(layer, technique, full, data_aware=True, calib_inputs=calib)
    assert error(exact) < 1e-6


def test_data_aware_needs_calibration_inputs() -> None:
    with pytest.raises(ValueError, match="calib_inputs"):
        rs.compress_layer(nn.Conv2d(8, 8, 3), "svd", 0.5, data_aware=True)
    with pytest.raises(ValueError, match="not offered"):
        rs.compress_layer(nn.Conv2d(8, 8, 3), "cp", 0.5, data_aware=True, calib_inputs=torch.randn(1, 8, 5, 5))


def test_compressed_layer_keeps_training_mode_and_grad() -> None:
    layer = nn.Conv2d(8, 8, 3).eval()
    module = rs.compress_layer(layer, "svd", 0.5)
    assert not module.training and all(p.requires_grad for p in module.parameters())
    assert "technique='svd'" in repr(module)


def test_float32_layer_gives_float32_replacement() -> None:
    layer = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    module = rs.compress_layer(layer, "tucker2", 1.0)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    torch.testing.assert_close(module(x), layer(x), rtol=1e-4, atol=1e-5)
