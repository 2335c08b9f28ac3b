"""Low-rank regularisation: the nuclear norm and its gradient against torch's SVD, the penalty's layers and
schedule, and training with it (a regularised model's truncated SVD keeps more of its weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.regularize import NuclearNormPenalty, nuclear_norm
from ranksearch.techniques.tensor import to_spatial_matrix
from ranksearch.training import DEFAULT_RECIPE, Recipe, train_baseline


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (64, 576), (7, 7)])
def test_nuclear_norm_and_gradient_match_torch_svd(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    matrix = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours = nuclear_norm(matrix)
    (grad,) = torch.autograd.grad(3 * ours, matrix)
    reference = torch.linalg.matrix_norm(matrix, ord="nuc")
    (expected,) = torch.autograd.grad(3 * reference, matrix)
    assert torch.allclose(ours, reference, rtol=1e-12)
    assert torch.allclose(grad, expected, atol=1e-10)


def test_rank_deficient_matrix_gets_a_finite_subgradient() -> None:
    matrix = (torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 10, dtype=torch.float64)).requires_grad_()
    value = nuclear_norm(matrix)
    (grad,) = torch.autograd.grad(value, matrix)
    assert torch.isfinite(grad).all()
    assert torch.allclose(value, torch.linalg.svdvals(matrix.detach()).sum(), rtol=1e-12)
    u, _, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
    assert torch.allclose(grad, u[:, :2] @ vh[:2], atol=1e-8)  # U V^T over the nonzero singular values


def test_penalty_covers_ungrouped_convs_and_linears_by_name() -> None:
    model = net()
    penalty = NuclearNormPenalty(model, strength=0.5)
    assert penalty.layers == ("0", "3", "6")
    expected = sum(torch.linalg.matrix_norm(model[i].weight.flatten(1), ord="nuc") for i in (0, 3, 6))
    assert torch.allclose(penalty(), 0.5 * expected, rtol=1e-5)


def test_spatial_unfolding_is_spatial_svds_matrix() -> None:
    model = net()
    penalty = NuclearNormPenalty(model, unfolding="spatial", layers=["3"])
    matrix = to_spatial_matrix(model[3].weight, groups=1)[0]
    assert matrix.shape == (8 * 3, 16 * 3)
    assert torch.allclose(penalty.nuclear_norm("3"), torch.linalg.matrix_norm(matrix, ord="nuc"), rtol=1e-5)


def test_every_nth_call_carries_the_whole_penalty() -> None:
    model = net()
    full = NuclearNormPenalty(model, strength=1e-3)().item()
    sparse = NuclearNormPenalty(model, strength=1e-3, every=4)
    values = [sparse().item() for _ in range(8)]
    assert values[0] == pytest.approx(4 * full) and values[4] == pytest.approx(4 * full)
    assert values[1:4] == [0.0] * 3 and sum(values) == pytest.approx(8 * full)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"layers": ["2"]}, "layer '2'"),
        ({"layers": ["nope"]}, "layer 'nope'"),
        ({"strength": -1.0}, "strength -1.0"),
        ({"unfolding": "rows"}, "unfolding 'rows'"),
        ({"every": 0}, "every 0"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(RanksearchError, match=culprit):
        NuclearNormPenalty(net(), **kwargs)


def test_recipe_key_of_unregularised_recipes_is_unchanged() -> None:
    """Baselines cached before the nuclear-norm option existed keep their key (the first release's)."""
    assert DEFAULT_RECIPE.key() == "295f68ef07eeb474"
    assert Recipe(nuclear_norm=1e-3).key() != DEFAULT_RECIPE.key()


def test_regularised_training_concentrates_the_spectrum(tmp_path: Path) -> None:
    """Same data, seed and steps: the penalised model keeps more of each weight in its top singular values."""
    from ranksearch.data import load_dataset

    splits = load_dataset("fashion_mnist", root=tmp_path / "data", train_subset=512, eval_subset=256)
    energies = {}
    for strength in (0.0, 0.05):
        recipe = Recipe(epochs=2, batch_size=32, lr=0.05, nuclear_norm=strength)
        model, meta = train_baseline(
            net(), splits, recipe, device="cpu", cache_dir=tmp_path, key_parts={"m": "net"}, progress=False
        )
        assert meta["recipe"]["nuclear_norm"] == strength
        values = torch.linalg.svdvals(model[3].weight.detach().flatten(1))
        energies[strength] = (values[:4].sum() / values.sum()).item()
    assert energies[0.05] > energies[0.0] + 0.05, energies
