"""A user's own photos: a generated RGB image folder (one file corrupt) through run, show, export and apply."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from conftest import require_tool
from typer.testing import CliRunner

from ranksearch.cli import app
from ranksearch.errors import RanksearchError
from ranksearch.results.record import SETTINGS
from ranksearch.study import RunSettings
from ranksearch.study.problem import check_fingerprint, load_splits

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ranksearch sample-folder``: 4 classes of 64 px colour JPEGs (24 training, 6 test images each), plus a
    file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    sample = ["sample-folder", str(folder), "--size", "64", "--train-per-class", "24", "--test-per-class", "6"]
    result = runner.invoke(app, [*sample, "--classes", "4", "--data-root", str(root / "data")])
    assert result.exit_code == 0, result.output
    assert "wrote 96 training and 24 test images" in result.stdout
    (folder / "train" / "dress" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


@pytest.mark.timeout(600)
def test_an_image_folder_runs_end_to_end(photos: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RANKSEARCH_LOADER_WORKERS", "2")
    results = tmp_path / "results"
    run = [
        *("run", "--model", "resnet18", "--dataset", f"imagefolder:{photos}", "--image-size", "48"),
        *("--budget", "3", "--baseline-epochs", "1", "--finetune-steps", "2", "--batch-size", "16"),
        *("--promote-steps", "0", "--final-epochs", "0", "--no-sensitivity", "--no-early-reject", "--no-latency-table"),
        *("--threads", "1", "--study-name", "photos", "--results-dir", str(results), "--no-fold-batchnorm"),
    ]
    result = runner.invoke(app, run)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image files: train/dress/broken.jpg" in result.output
    assert "search space: resnet.yaml; pass --space FILE for another" in result.output
    rows = json.loads((results / "photos" / "pareto.json").read_text())
    assert rows["front"]
    shown = runner.invoke(app, ["show", "photos", "--results-dir", str(results)])
    assert shown.exit_code == 0, shown.output
    config = tmp_path / "config.json"
    exported = runner.invoke(
        app, ["export", "photos", "--trial", "1", "--out", str(config), "--results-dir", str(results)]
    )
    assert exported.exit_code == 0, exported.output
    spec = json.loads(config.read_text())["model"]
    assert (spec["in_channels"], spec["image_size"], spec["num_classes"]) == (3, 48, 4)
    out = tmp_path / "compressed.pt"
    applied = runner.invoke(app, ["apply", "--config", str(config), "--out", str(out), "--threads", "1"])
    assert applied.exit_code == 0, applied.output
    model = torch.load(out, weights_only=False)
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 4)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("resnet50", (224, 232, "bilinear")),
        ("efficientnet_b0", (224, 256, "bicubic")),
        ("timm:resnet18", (224, 235, "bicubic")),
    ],
)
def test_pretrained_weights_say_how_images_are_preprocessed(photos: Path, model: str, expected: tuple) -> None:
    """--weights names the preprocessing (read offline from the weights' metadata: nothing is downloaded):
    resize, centre crop and ImageNet normalisation, whatever size the photos are."""
    if model.startswith("timm:"):
        require_tool("timm")
    settings = RunSettings.of(model=model, weights="DEFAULT", dataset=f"imagefolder:{photos}")
    splits = load_splits(settings, eval_subset=None)
    recipe = splits.val.preprocessing
    assert (recipe.size, recipe.resize, recipe.interpolation) == expected
    assert recipe.mean == (0.485, 0.456, 0.406) and recipe.std == (0.229, 0.224, 0.225)
    assert splits.val[0][0].shape == (3, 224, 224) and splits.image_size == 224


def test_an_image_folder_study_refuses_other_files_with_its_fix() -> None:
    study = optuna.create_study(study_name="photos", directions=["maximize", "minimize"])
    SETTINGS.write(study, {"dataset": "imagefolder:photos"})
    check_fingerprint(study, {"model": "m", "data": "before"}, checkpoint=None)
    with pytest.raises(RanksearchError, match=r"the same files must be in the folder .* start a new one"):
        check_fingerprint(study, {"model": "other weights", "data": "after"}, checkpoint=None)  # data comes first


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--classes", "11"], "--classes 11: Fashion-MNIST has 10 classes"), (["--size", "0"], "--size 0: must be")],
)
def test_sample_folder_bad_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["sample-folder", str(tmp_path / "photos"), *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "photos").exists()
