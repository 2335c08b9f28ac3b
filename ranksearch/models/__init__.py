"""Build classification models for a dataset: torchvision models adapted to small images, or custom factories."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torchvision
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.util import describe, first_line, import_module_from

__all__ = [
    "ModelEntry",
    "build_model",
    "find_models",
    "list_model_names",
    "load_checkpoint",
    "model_family",
    "pretrained_preprocessing",
]

SMALL_IMAGE_SIZE = 64
TIMM_PREFIX = "timm:"
"""``--model timm:NAME`` builds a timm model (the optional ``timm`` extra)."""
_FAMILIES = (("resnet", ("resnet", "resnext", "wide_resnet")), ("mobilenet", ("mobilenet",)))


def list_model_names() -> list[str]:
    """The torchvision classification model names ``build_model`` accepts."""
    return torchvision.models.list_models(module=torchvision.models)


@dataclass(frozen=True)
class ModelEntry:
    """A model ``--model`` can name: its family (which picks the shipped search space) and the pretrained weights
    ``--weights`` can name for it (downloaded when online; offline, pass ``--checkpoint``)."""

    name: str
    family: str
    weights: tuple[str, ...]


def find_models(pattern: str | None = None) -> list[ModelEntry]:
    """The torchvision classification models whose names match the shell-style ``pattern`` (``resnet*``; a plain
    word matches names containing it; None: all), sorted by name; an error when none does. A pattern starting with
    ``timm:`` lists timm's models instead (``timm:`` alone: all of them)."""
    if pattern and pattern.startswith(TIMM_PREFIX):
        return _find_timm_models(pattern.removeprefix(TIMM_PREFIX))
    names = list_model_names()
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, _glob(pattern))]
        if not names:
            raise RanksearchError(
                f"no model matches {pattern!r}; run `ranksearch models` to list them all, or pass file.py:factory"
            )
    return [
        ModelEntry(
            name=name,
            family=model_family(name),
            weights=tuple(w.name for w in torchvision.models.get_model_weights(name)),
        )
        for name in sorted(names)
    ]


def _glob(pattern: str) -> str:
    """A shell-style pattern as given, or a plain word as "names containing it"."""
    return pattern.lower() if any(c in pattern for c in "*?[") else f"*{pattern.lower()}*"


def _find_timm_models(pattern: str) -> list[ModelEntry]:
    timm = _timm()
    names = timm.list_models(_glob(pattern) if pattern else "*")
    if not names:
        raise RanksearchError(f"no timm model matches {pattern!r}; run `ranksearch models timm:` to list them all")
    pretrained = {tag.split(".")[0] for tag in timm.list_pretrained(_glob(pattern) if pattern else "*")}
    return [
        ModelEntry(
            name=f"{TIMM_PREFIX}{name}",
            family=model_family(f"{TIMM_PREFIX}{name}"),
            weights=("DEFAULT",) if name in pretrained else (),
        )
        for name in sorted(names)
    ]


def model_family(spec: str) -> str:
    """The architecture family of ``spec`` ("resnet", "mobilenet", "vgg", "efficientnet", ... or "custom"); a timm
    model's is read from its name as a torchvision one's (``timm:resnet50`` is a "resnet")."""
    if spec.startswith(TIMM_PREFIX):
        name = spec.removeprefix(TIMM_PREFIX)
        return next((family for family, prefixes in _FAMILIES if name.startswith(prefixes)), _word(name))
    if ":" in spec:
        return "custom"
    _check_name(spec)
    for family, prefixes in _FAMILIES:
        if spec.startswith(prefixes):
            return family
    return _word(spec)


def _word(name: str) -> str:
    found = re.match(r"[a-z]+", name)
    return found.group(0) if found else "custom"


def build_model(
    spec: str, *, num_classes: int, in_channels: int, image_size: int, weights: str | None = None
) -> nn.Module:
    """Build ``spec`` for ``num_classes`` classes of ``in_channels`` x ``image_size`` x ``image_size`` images.

    ``spec`` is a torchvision classification model name, ``path/to/file.py:factory`` or
    ``package.module:factory``; a factory gets ``num_classes`` and ``in_channels`` when its signature
    accepts them. ``weights`` names torchvision pretrained weights ("DEFAULT", "IMAGENET1K_V1", ...).

    Torchvision models are adapted: the first convolution takes ``in_channels`` (pretrained RGB
    filters are averaged over colour), the classifier head outputs ``num_classes``, and for images
    under 64 px VGG keeps only the max-pools that leave at least a 1x1 map, with its 7x7 adaptive pool
    replaced by a global pool (pretrained first classifier weights are summed over the 7x7 positions,
    which is exact for a 1x1 map). ResNet, MobileNet and EfficientNet keep their stems, chosen by
    measurement for ResNet-18 on 28x28 Fashion-MNIST (training throughput per CPU thread, with
    ``ranksearch.training``'s CPU path): the standard 7x7/2 conv + max-pool stem costs 33 MMACs/image
    and trains at ~165 images/s; a 3x3/1 conv keeping the max-pool (layer1 at 14x14) costs 122 MMACs
    and trains 5x slower; also dropping the max-pool costs 456 MMACs, 15x slower. Only the standard
    stem leaves room for a 50-trial search with fine-tuning on 2 cores. MobileNetV2 costs 5.6 and
    EfficientNet-B0 7.9 MMACs/image at 28x28.
    Every model is checked with one forward pass on a dummy batch.
    """
    if spec.startswith(TIMM_PREFIX):
        model = _build_timm(
            spec.removeprefix(TIMM_PREFIX), num_classes=num_classes, in_channels=in_channels, weights=weights
        )
    elif ":" in spec:
        if weights is not None:
            raise RanksearchError(f"--weights applies to torchvision and timm models, not {spec!r}; use --checkpoint")
        model = _build_custom(spec, num_classes=num_classes, in_channels=in_channels)
    else:
        model = _build_torchvision(
            spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size, weights=weights
        )
    _check_forward(model, spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, *, trust: bool = False) -> nn.Module:
    """Load a state_dict (bare, or under "state_dict"/"model") from ``path`` into ``model``.

    Only tensors and plain containers are unpickled (``torch.load(weights_only=True)``): unpickling anything else
    can run any code the file holds. A whole pickled model, or a state_dict saved with other objects, loads only
    with ``trust=True`` (``--trust-checkpoint``), for files from a source the user trusts.
    """
    path = Path(path)
    if not path.is_file():
        raise RanksearchError(f"checkpoint {path} does not exist; pass the path of a saved model to --checkpoint")
    try:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            needed = _unsafe_global(exc)
            if not trust and needed is not None:
                raise RanksearchError(
                    f"checkpoint {path} holds pickled objects other than tensors (it needs {needed}), and "
                    "loading them could run any code in the file; save only the weights with "
                    "torch.save(model.state_dict(), path), or pass --trust-checkpoint if you trust its source"
                ) from None
            if not trust:
                raise
            raw = torch.load(path, map_location="cpu", weights_only=False)
    except RanksearchError:
        raise
    except Exception as exc:
        raise RanksearchError(
            f"checkpoint {path} is unreadable ({first_line(exc).split('. ')[0]}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    state = _unwrap_state_dict(raw)
    if state is None:
        raise RanksearchError(
            f"checkpoint {path} holds no state_dict (got {type(raw).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    expected = model.state_dict()
    problem = _first_mismatch(state, expected)
    if problem is not None:
        raise RanksearchError(
            f"checkpoint {path} does not fit the model: {problem}; "
            "build the model with the --model/--dataset the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=False)
    return model


def _unsafe_global(error: pickle.UnpicklingError) -> str | None:
    """The object ``torch.load(weights_only=True)`` refused (its message names it ``GLOBAL x.Y``); None when the
    file failed for another reason (not a pickle at all)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def _check_name(name: str) -> None:
    names = list_model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `ranksearch models` to list them"
        raise RanksearchError(f"unknown model {name!r}; pass a torchvision model name or file.py:factory ({hint})")


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise RanksearchError(
            "timm is not installed; pip install 'ranksearch[timm]' (or timm) to build timm:NAME models"
        ) from None
    return timm


def _build_timm(name: str, *, num_classes: int, in_channels: int, weights: str | None) -> nn.Module:
    """A timm model built offline from its architecture (``weights``: timm's pretrained weights, downloaded; the
    head and stem are then adapted by timm itself to ``num_classes`` and ``in_channels``)."""
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(f'timm:{c}' for c in close)}?"
            if close
            else "`ranksearch models timm:` lists them"
        )
        raise RanksearchError(f"unknown timm model {name!r}; {hint}")
    if weights is not None and weights != "DEFAULT":
        raise RanksearchError(f"--weights {weights!r}: timm models take --weights DEFAULT (its pretrained tag) or none")
    try:
        return timm.create_model(name, pretrained=weights is not None, num_classes=num_classes, in_chans=in_channels)
    except Exception as exc:  # a download failure offline, or an architecture timm cannot build so
        raise RanksearchError(
            f"timm could not build {name!r} ({describe(exc)}); offline, build it without --weights and pass "
            "--checkpoint"
        ) from None


def _build_torchvision(
    name: str, *, num_classes: int, in_channels: int, image_size: int, weights: str | None
) -> nn.Module:
    _check_name(name)
    if weights is None:
        model = torchvision.models.get_model(name, num_classes=num_classes)
    else:
        model = _pretrained(name, weights)
        _replace_head(model, num_classes)
    pretrained = weights is not None
    _adapt_first_conv(model, in_channels, pretrained=pretrained)
    if image_size < SMALL_IMAGE_SIZE and model_family(name) == "vgg":
        _adapt_vgg(model, image_size, pretrained=pretrained)
    return model


def pretrained_preprocessing(spec: str, weights: str | None) -> dict[str, Any] | None:
    """How the images behind ``spec``'s pretrained ``weights`` were preprocessed, read offline from the weights'
    metadata: ``{"size": crop side, "resize": shorter side before the crop, "mean", "std", "interpolation"}``; None
    without weights (or for a custom model)."""
    if weights is None or ":" in spec.removeprefix(TIMM_PREFIX):
        return None
    if spec.startswith(TIMM_PREFIX):
        config = _timm().models.get_pretrained_cfg(spec.removeprefix(TIMM_PREFIX))
        if config is None:
            return None
        size = int(config.input_size[-1])
        return {
            "size": size,
            "resize": math.floor(size / config.crop_pct),
            "mean": tuple(config.mean),
            "std": tuple(config.std),
            "interpolation": str(config.interpolation or "bilinear"),
        }
    _check_name(spec)
    transforms = _weights_enum(spec, weights).transforms()
    return {
        "size": int(transforms.crop_size[0]),
        "resize": int(transforms.resize_size[0]),
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "interpolation": transforms.interpolation.value,
    }


def _weights_enum(name: str, weights: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights.upper()]
    except KeyError:
        known = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise RanksearchError(f"unknown weights {weights!r} for {name}; use one of {known}") from None


def _pretrained(name: str, weights: str) -> nn.Module:
    resolved = _weights_enum(name, weights)
    try:
        return torchvision.models.get_model(name, weights=resolved)
    except Exception as exc:
        raise RanksearchError(
            f"could not download {name} weights {resolved.name} ({describe(exc)}); "
            "when offline pass a local checkpoint with --checkpoint instead"
        ) from None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last 1000-way Linear (or 1x1 Conv2d, as in SqueezeNet) for a fresh ``num_classes``-way one."""
    heads = [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and module.out_features == 1000)
        or (isinstance(module, nn.Conv2d) and module.out_channels == 1000)
    ]
    if num_classes == 1000:
        return
    name, old = heads[-1]
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    model.set_submodule(name, new)


def _adapt_first_conv(model: nn.Module, in_channels: int, *, pretrained: bool) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def _adapt_vgg(model: nn.Module, image_size: int, *, pretrained: bool) -> None:
    size = image_size
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            if size // 2 < 1:
                model.features[i] = nn.Identity()
            else:
                size //= 2
    pooled = model.avgpool.output_size
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    old = model.classifier[0]
    new = nn.Linear(old.in_features // (pooled[0] * pooled[1]), old.out_features)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(old.weight.view(old.out_features, new.in_features, -1).sum(-1))
            new.bias.copy_(old.bias)
    model.classifier[0] = new


def _build_custom(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    target, _, attr = spec.rpartition(":")
    module = _import_factory_module(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RanksearchError(f"{target} has no factory {attr!r}; pick one of: {', '.join(found) or '(none)'}")
    kwargs = _factory_kwargs(factory, num_classes=num_classes, in_channels=in_channels)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # user code: whatever it raises is reported in one line, not raised
        arguments = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise RanksearchError(
            f"model factory {spec!r} raised while building the model ({describe(exc)}) when called with "
            f"({arguments}); fix the factory"
        ) from None
    if not isinstance(model, nn.Module):
        raise RanksearchError(f"factory {spec!r} returned {type(model).__name__}; it must return a torch.nn.Module")
    return model


def _import_factory_module(target: str) -> ModuleType:
    """The module of a ``file.py:factory`` or ``package.module:factory`` spec, else a one-line error."""
    if target.endswith(".py") or "/" in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise RanksearchError(f"model file {file} does not exist; pass an existing path/to/file.py:factory")
        try:
            return import_module_from(target)
        except Exception as exc:  # the file is user code: whatever its import raises is reported, not raised
            raise RanksearchError(f"importing model file {file} failed ({describe(exc)}); fix that file") from None
    try:
        return import_module_from(target)
    except ImportError as exc:
        raise RanksearchError(
            f"cannot import module {target!r} ({exc}); check the package.module:factory spelling"
        ) from None


def _factory_kwargs(factory: Any, **available: int) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return available
    return {k: v for k, v in available.items() if k in params}


def _check_forward(model: nn.Module, spec: str, *, num_classes: int, in_channels: int, image_size: int) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as exc:
        raise RanksearchError(
            f"model {spec!r} fails on {in_channels}x{image_size}x{image_size} inputs ({first_line(exc)}); "
            "pick a model that handles small images, e.g. resnet18"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RanksearchError(f"model {spec!r} outputs {shape} for one image; it must output (1, {num_classes}) logits")


def _unwrap_state_dict(raw: object) -> dict[str, torch.Tensor] | None:
    if isinstance(raw, nn.Module):
        return raw.state_dict()
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if key in raw and isinstance(raw[key], Mapping | nn.Module):
                return _unwrap_state_dict(raw[key])
        if raw and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
            prefix = "module."
            if all(k.startswith(prefix) for k in raw):
                return {k[len(prefix) :]: v for k, v in raw.items()}
            return dict(raw)
    return None


def _first_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            return f"missing key {key!r}"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
    extra = next((key for key in state if key not in expected), None)
    return None if extra is None else f"unexpected key {extra!r}"
