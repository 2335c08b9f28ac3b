"""Search spaces: which layers are searched, and the techniques, ranks and options each layer may take.

A search space is a small YAML file (``search_spaces/resnet.yaml`` documents the format in its comments)::

    layers:
      include: ["*"]          # glob patterns over qualified layer names; "*" also crosses dots
      exclude: [conv1, fc]    # layers matching any of these are not searched
      types: [Conv2d]         # Conv2d and/or Linear (default: both)
    techniques:               # per kind of layer; a kind left out is not searched
      spatial_conv: [keep, svd, spatial_svd, tucker2]   # Conv2d with a kernel larger than 1x1
      pointwise_conv: [keep, svd]                        # 1x1 Conv2d
      linear: [keep, svd]                                # Linear
    ranks: [0.25, 0.5, 0.75]  # fractions of full rank (floats in (0, 1]) and/or absolute ranks (ints >= 2),
                              # or a mapping kind -> such a list
    int8: true                # offer int8 kernels for every searched layer (default: false)
    data_aware: true          # offer data-aware decomposition where the technique has it (default: false)
    rank_multiple: 8          # fractions round to multiples of this (default: 8)
    options:                  # per-technique options, passed to every layer using the technique
      grouped_svd: {groups: 2}

A rank choice is one value for every rank dimension of a technique (tucker2 takes the same fraction
for its input and output ranks), which keeps the space small.

Use: ``space = SearchSpace.load(path)``; ``slots = space.layers(model, record_input_shapes(model, x))``
lists what each searched layer may become (only choices smaller than the dense layer); then, in an
optuna objective, ``sample_config(trial, slots, rank_multiple=space.rank_multiple)`` draws a
:class:`~ranksearch.config.CompressionConfig` define-by-run. :func:`config_to_params` and
:func:`uniform_config` build anchor trials for ``study.enqueue_trial``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import optuna
import torch
import yaml
from torch import nn

from ranksearch.compress import cost_report, layer_inputs
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import CompressionError, RanksearchError
from ranksearch.techniques import get_technique, list_techniques
from ranksearch.util import first_line

Rank = int | float
"""One rank choice: a fraction of full rank (float in (0, 1]) or an absolute rank (int >= 2)."""

KINDS = ("spatial_conv", "pointwise_conv", "linear")
LAYER_TYPES: Mapping[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}

_KIND_TYPE = {"spatial_conv": "Conv2d", "pointwise_conv": "Conv2d", "linear": "Linear"}
_TOP_KEYS = ("layers", "techniques", "ranks", "int8", "data_aware", "rank_multiple", "options")
_LAYER_KEYS = ("include", "exclude", "types")
_RANK_FIX = "use a fraction of full rank in (0, 1] such as 0.5, or an absolute rank as an int >= 2 such as 64"


def layer_kind(layer: nn.Module) -> str | None:
    """``spatial_conv``, ``pointwise_conv`` or ``linear``; ``None`` for any other module."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "pointwise_conv" if tuple(layer.kernel_size) == (1, 1) else "spatial_conv"
    return None


def _probe(kind: str) -> nn.Module:
    """A plain layer of ``kind``, to tell which techniques can ever apply to it."""
    return {"spatial_conv": nn.Conv2d(8, 8, 3), "pointwise_conv": nn.Conv2d(8, 8, 1), "linear": nn.Linear(8, 8)}[kind]


@dataclass(frozen=True)
class LayerSlot:
    """What one searched layer may become: techniques that fit it, and each one's viable rank choices."""

    name: str
    kind: str
    techniques: tuple[str, ...]
    ranks: Mapping[str, tuple[Rank, ...]]
    """Per technique, its rank choices (``()`` for a technique without ranks, such as keep)."""
    options: Mapping[str, Mapping[str, object]]
    """Per technique, the options the space gives it."""
    int8: bool
    data_aware: bool

    def offers_data_aware(self, technique: str) -> bool:
        """Whether ``data_aware`` is a choice for ``technique`` on this layer."""
        return self.data_aware and get_technique(technique).data_aware_capable


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; build it with :meth:`load` or :meth:`from_dict`."""

    techniques: Mapping[str, tuple[str, ...]]
    ranks: Mapping[str, tuple[Rank, ...]]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ("Conv2d", "Linear")
    int8: bool = False
    data_aware: bool = False
    rank_multiple: int = 8
    options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    source: str = "<dict>"

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Read and validate a YAML search space."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RanksearchError(f"search space {path}: cannot be read ({exc.strerror}); check the path") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RanksearchError(f"search space {path}: not valid YAML: {first_line(exc)}; fix the syntax") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: object, *, source: str = "<dict>") -> SearchSpace:
        """Validate the parsed YAML ``raw``; errors name ``source``, the key and the fix."""
        return _Reader(source).space(raw)

    def layers(self, model: nn.Module, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LayerSlot]:
        """The searchable layers of ``model`` in module order, each with only the choices that fit it.

        ``input_shapes`` maps layer names to their input shapes (see :func:`record_input_shapes`).
        A rank choice is kept when its replacement is no larger than the dense layer (params and
        MACs) and it resolves to integer ranks no earlier choice did; a layer left with nothing
        but ``keep`` is not searchable.
        """
        self.check_layers(model)
        candidates = self._candidates(model)
        slots: dict[str, LayerSlot] = {}
        for name, layer in candidates.items():
            kind = layer_kind(layer)
            if (
                kind not in self.techniques
                or not any(fnmatchcase(name, p) for p in self.include)
                or any(fnmatchcase(name, p) for p in self.exclude)
            ):
                continue
            if name not in input_shapes:
                raise RanksearchError(
                    f"layer {name!r}: no input shape recorded; "
                    "pass input_shapes=record_input_shapes(model, example_input)"
                )
            slot = self._slot(name, layer, kind, tuple(input_shapes[name]))
            if slot is not None:
                slots[name] = slot
        return slots

    def check_layers(self, model: nn.Module) -> None:
        """Every ``layers.include`` pattern matches a layer of ``model`` (weights play no part, so an untrained
        model can be checked before a long training)."""
        candidates = list(self._candidates(model))
        for pattern in self.include:
            if not any(fnmatchcase(name, pattern) for name in candidates):
                close = difflib.get_close_matches(pattern, candidates, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "use globs such as 'layer1.*'"
                raise RanksearchError(
                    f"search space {self.source}: layers.include: pattern {pattern!r} matches no "
                    f"{'/'.join(self.types)} layer of {type(model).__name__}; {hint}"
                )

    def _candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        return {
            name: layer
            for name, layer in model.named_modules()
            if any(isinstance(layer, LAYER_TYPES[t]) for t in self.types)
        }

    def _slot(self, name: str, layer: nn.Module, kind: str, shape: tuple[int, ...]) -> LayerSlot | None:
        try:
            cost_report(layer, "keep", None, shape)
        except CompressionError as exc:  # input shapes are the caller's: a shape that does not fit is a user error
            raise RanksearchError(str(exc)) from None
        ranks: dict[str, tuple[Rank, ...]] = {}
        for technique in self.techniques[kind]:
            t = get_technique(technique)
            if t.unsupported_reason(layer) is not None:
                continue
            choices = self._viable_ranks(layer, technique, kind, shape) if t.rank_names else ()
            if choices or not t.rank_names:
                ranks[technique] = choices
        if set(ranks) <= {"keep"}:
            return None
        return LayerSlot(
            name=name,
            kind=kind,
            techniques=tuple(ranks),
            ranks=ranks,
            options={t: dict(self.options.get(t, {})) for t in ranks},
            int8=self.int8,
            data_aware=self.data_aware and any(get_technique(t).data_aware_capable for t in ranks),
        )

    def _viable_ranks(self, layer: nn.Module, technique: str, kind: str, shape: tuple[int, ...]) -> tuple[Rank, ...]:
        seen: set[tuple[int, ...]] = set()
        viable: list[Rank] = []
        for rank in self.ranks[kind]:
            try:
                report = cost_report(
                    layer, technique, rank, shape, rank_multiple=self.rank_multiple, **self.options.get(technique, {})
                )
            except CompressionError:  # e.g. an absolute rank above this layer's full rank
                continue
            if not report.larger and report.ranks not in seen:
                seen.add(report.ranks)
                viable.append(rank)
        return tuple(viable)


def record_input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape of every Conv2d and Linear of ``model`` on one eval-mode, no-grad pass of ``example_input``.

    Each module's training flag is restored afterwards.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    return {name: tuple(x.shape) for name, x in layer_inputs(model, names, example_input).items()}


def sample_config(
    trial: optuna.trial.BaseTrial, slots: Mapping[str, LayerSlot], *, rank_multiple: int
) -> CompressionConfig:
    """A configuration drawn define-by-run from ``trial``, one choice for every slot.

    Parameters: ``{layer}:technique``, then for the chosen technique ``{layer}:{technique}:rank``
    (when it has ranks), ``{layer}:{technique}:int8`` and ``{layer}:{technique}:data_aware``
    (when offered). ``rank_multiple`` must be the one the slots were built with.
    """
    layers: dict[str, LayerChoice] = {}
    for name, slot in slots.items():
        technique = str(trial.suggest_categorical(f"{name}:technique", slot.techniques))
        choices = slot.ranks[technique]
        rank = trial.suggest_categorical(f"{name}:{technique}:rank", choices) if choices else None
        int8 = bool(slot.int8 and trial.suggest_categorical(f"{name}:{technique}:int8", (False, True)))
        data_aware = bool(
            slot.offers_data_aware(technique)
            and trial.suggest_categorical(f"{name}:{technique}:data_aware", (False, True))
        )
        layers[name] = LayerChoice(technique, rank, int8, data_aware, dict(slot.options[technique]))
    return CompressionConfig(layers=layers, rank_multiple=rank_multiple)


def config_to_params(config: CompressionConfig, slots: Mapping[str, LayerSlot]) -> dict[str, object]:
    """The trial parameters under which :func:`sample_config` returns ``config`` (for ``study.enqueue_trial``).

    A slot that ``config`` leaves out is taken as ``keep``.
    """
    stray = [name for name in config.layers if name not in slots]
    if stray:
        raise RanksearchError(f"layer {stray[0]!r}: the config names a layer the search space does not search; drop it")
    params: dict[str, object] = {}
    for name, slot in slots.items():
        params.update(_layer_params(slot, config.layers.get(name, LayerChoice("keep"))))
    return params


def _layer_params(slot: LayerSlot, choice: LayerChoice) -> dict[str, object]:
    technique = choice.technique
    prefix = f"{slot.name}:{technique}"

    def fail(problem: str, fix: str) -> RanksearchError:
        return RanksearchError(f"layer {slot.name!r}: technique {technique!r}: {problem}; {fix}")

    if technique not in slot.techniques:
        raise fail("not offered for this layer", f"pick one of {', '.join(slot.techniques)}")
    params: dict[str, object] = {f"{slot.name}:technique": technique}
    choices = slot.ranks[technique]
    if choices:
        if not any(_same_rank(choice.rank, c) for c in choices):
            raise fail(f"rank {choice.rank!r} is not a choice", f"pick one of {', '.join(map(str, choices))}")
        params[f"{prefix}:rank"] = choice.rank
    elif choice.rank is not None:
        raise fail(f"takes no rank, got {choice.rank!r}", "drop the rank")
    for flag, offered in (("int8", slot.int8), ("data_aware", slot.offers_data_aware(technique))):
        if offered:
            params[f"{prefix}:{flag}"] = getattr(choice, flag)
        elif getattr(choice, flag):
            raise fail(f"{flag} is not offered here", f"set {flag} to false")
    t = get_technique(technique)
    if t.options(choice.options) != t.options(slot.options[technique]):
        raise fail(f"options {dict(choice.options)} differ from the search space's", "drop them from the config")
    return params


def uniform_config(
    slots: Mapping[str, LayerSlot], technique: str, fraction: Rank | None = None, *, rank_multiple: int
) -> CompressionConfig:
    """``technique`` at rank choice ``fraction`` on every slot offering both, ``keep`` on the rest.

    ``fraction`` is ``None`` for a technique without ranks (``uniform_config(slots, "keep", ...)``
    is the uncompressed anchor).
    """
    if (fraction is None) != (not get_technique(technique).rank_names):
        need = "needs a rank choice" if fraction is None else f"takes no rank, got {fraction!r}"
        raise RanksearchError(f"uniform_config: technique {technique!r} {need}; fix the fraction argument")
    layers = {
        name: (
            LayerChoice(technique, fraction, options=dict(slot.options[technique]))
            if technique in slot.techniques
            and (fraction is None or any(_same_rank(fraction, c) for c in slot.ranks[technique]))
            else LayerChoice("keep")
        )
        for name, slot in slots.items()
    }
    return CompressionConfig(layers=layers, rank_multiple=rank_multiple)


def _same_rank(a: object, b: Rank) -> bool:
    """Equal rank choices: ``2`` (absolute) and ``2.0`` would differ, and bools are never ranks."""
    return type(a) is type(b) and a == b


class _Reader:
    """Validates a parsed search space; every error names the source, the key and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> RanksearchError:
        return RanksearchError(f"search space {self.source}: {key}: {problem}; {fix}")

    def mapping(self, value: object, key: str, allowed: tuple[str, ...], example: str) -> Mapping[str, object]:
        if not isinstance(value, Mapping):
            raise self.fail(key or "top level", f"expected a mapping, got {value!r}", f"write it like {example}")
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
                raise self.fail(f"{key}.{name}" if key else str(name), "unknown key", fix)
        return value

    def strings(
        self, value: object, key: str, allowed: tuple[str, ...] | None = None, *, empty_ok: bool = False
    ) -> tuple[str, ...]:
        if not isinstance(value, list) or not (value or empty_ok) or not all(isinstance(v, str) for v in value):
            example = f"[{', '.join(allowed)}]" if allowed else '["layer1.*"]'
            raise self.fail(key, f"expected a non-empty list of names, got {value!r}", f"write it like {example}")
        for i, v in enumerate(value):
            if allowed is not None and v not in allowed:
                close = difflib.get_close_matches(v, allowed, n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(allowed)}"
                raise self.fail(f"{key}[{i}]", f"unknown name {v!r}", fix)
            if value.index(v) != i:
                raise self.fail(f"{key}[{i}]", f"{v!r} is listed twice", "remove the duplicate")
        return tuple(value)

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}", "write true or false")
        return value

    def space(self, raw: object) -> SearchSpace:
        top = self.mapping(raw, "", _TOP_KEYS, "the example at the top of search_spaces/resnet.yaml")
        if "techniques" not in top:
            raise self.fail("techniques", "missing", "list the techniques per kind, e.g. spatial_conv: [keep, svd]")
        layers = self.mapping(top.get("layers", {}), "layers", _LAYER_KEYS, 'include: ["*"]')
        types = self.strings(layers.get("types", list(LAYER_TYPES)), "layers.types", tuple(LAYER_TYPES))
        techniques = self.techniques(top["techniques"], types)
        ranked = [k for k, names in techniques.items() if any(get_technique(t).rank_names for t in names)]
        rank_multiple = top.get("rank_multiple", 8)
        if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
            problem = f"expected an int >= 1, got {rank_multiple!r}"
            raise self.fail("rank_multiple", problem, "write e.g. 8 (1 turns rounding off)")
        return SearchSpace(
            techniques=techniques,
            ranks=self.ranks(top.get("ranks"), ranked),
            include=self.strings(layers.get("include", ["*"]), "layers.include"),
            exclude=self.strings(layers.get("exclude", []), "layers.exclude", empty_ok=True),
            types=types,
            int8=self.boolean(top.get("int8", False), "int8"),
            data_aware=self.boolean(top.get("data_aware", False), "data_aware"),
            rank_multiple=rank_multiple,
            options=self.options(top.get("options", {}), techniques),
            source=self.source,
        )

    def techniques(self, value: object, types: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        by_kind = self.mapping(value, "techniques", KINDS, "spatial_conv: [keep, svd]")
        if not by_kind:
            raise self.fail("techniques", "no kind of layer is listed", "list e.g. spatial_conv: [keep, svd]")
        out: dict[str, tuple[str, ...]] = {}
        for kind, names in by_kind.items():
            key = f"techniques.{kind}"
            if _KIND_TYPE[kind] not in types:
                raise self.fail(key, f"layers.types leaves out {_KIND_TYPE[kind]}", f"add it there or remove {key}")
            out[kind] = self.strings(names, key, tuple(list_techniques()))
            probe = _probe(kind)
            for i, name in enumerate(out[kind]):
                reason = get_technique(name).unsupported_reason(probe)
                if reason:
                    raise self.fail(f"{key}[{i}]", f"{name} cannot replace a {kind} layer: {reason}", "remove it")
        return out

    def ranks(self, value: object, kinds: list[str]) -> dict[str, tuple[Rank, ...]]:
        if value is None:
            if kinds:
                raise self.fail("ranks", f"missing, but {kinds[0]} techniques need ranks", "add e.g. [0.25, 0.5]")
            return {}
        if isinstance(value, list):
            grid = self.grid(value, "ranks")
            return {kind: grid for kind in kinds}
        per_kind = self.mapping(value, "ranks", KINDS, "[0.25, 0.5] or {spatial_conv: [0.25, 0.5]}")
        for kind in per_kind:
            if kind not in kinds:
                raise self.fail(f"ranks.{kind}", f"no ranked technique is listed for {kind}", "remove it")
        missing = [kind for kind in kinds if kind not in per_kind]
        if missing:
            raise self.fail(f"ranks.{missing[0]}", "missing", f"add a rank list for {missing[0]}")
        return {kind: self.grid(per_kind[kind], f"ranks.{kind}") for kind in kinds}

    def grid(self, value: object, key: str) -> tuple[Rank, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of ranks, got {value!r}", "write e.g. [0.25, 0.5, 0.75]")
        for i, rank in enumerate(value):
            where = f"{key}[{i}]"
            if isinstance(rank, bool) or not isinstance(rank, int | float):
                raise self.fail(where, f"{rank!r} is not a rank", _RANK_FIX)
            if isinstance(rank, float) and not 0.0 < rank <= 1.0:
                raise self.fail(where, f"fraction {rank} is outside (0, 1]", _RANK_FIX)
            if isinstance(rank, int) and rank < 2:
                raise self.fail(where, f"absolute rank {rank} is below 2", "write 1.0 for full rank, or an int >= 2")
            if any(_same_rank(rank, other) for other in value[:i]):
                raise self.fail(where, f"{rank!r} is listed twice", "remove the duplicate")
        return tuple(value)

    def options(self, value: object, techniques: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, object]]:
        per_technique = self.mapping(value, "options", tuple(list_techniques()), "grouped_svd: {groups: 2}")
        out: dict[str, dict[str, object]] = {}
        for name, given in per_technique.items():
            if not any(name in names for names in techniques.values()):
                raise self.fail(f"options.{name}", f"{name} is not listed under techniques", "list it or remove this")
            defaults = get_technique(name).default_options
            allowed = tuple(defaults)
            if not allowed:
                raise self.fail(f"options.{name}", f"{name} takes no options", "remove it")
            given = self.mapping(given, f"options.{name}", allowed, f"{{{allowed[0]}: {defaults[allowed[0]]!r}}}")
            for option, v in given.items():
                default = defaults[option]
                ok = type(v) is type(default) or (isinstance(default, float) and type(v) is int)
                if not ok:
                    problem = f"expected {type(default).__name__}, got {v!r}"
                    raise self.fail(f"options.{name}.{option}", problem, f"write e.g. {default!r}")
            out[name] = dict(given)
        return out
