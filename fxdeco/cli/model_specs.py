"""Models named on the command line: ``torchvision:NAME``, ``timm:NAME``, ``hf:DIR`` or ``FILE.py:FACTORY``.

Nothing is downloaded: torchvision and timm models are built with random
weights unless a weights file is given, Hugging Face models load from a local
directory with the hub switched offline, and a factory is a function in a local
Python file that returns an ``nn.Module``.

A factory model may say what one input sample looks like (batch dimension
excluded), for ``--calib random``: an ``example_input_shape`` attribute on the
model, or an ``example_input_shape`` in the file (e.g. ``(32,)``). Otherwise a
model with no convolution whose first layer is an ``nn.Linear`` is fed
vectors of its ``in_features``; any other model is fed images.

Example:
    >>> spec = parse_model_spec("torchvision:resnet18")
    >>> spec.kind, spec.name
    ('torchvision', 'resnet18')
    >>> parse_model_spec("resnet18")
    Traceback (most recent call last):
    ...
    fxdeco.cli.model_specs.ModelSpecError: unknown model spec 'resnet18': write torchvision:NAME, timm:NAME, hf:DIR or \
path/to/file.py:FACTORY
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import pathlib
import sys
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("torchvision", "timm", "hf")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
USAGE = "write torchvision:NAME, timm:NAME, hf:DIR or path/to/file.py:FACTORY"


class ModelSpecError(ValueError):
    """A model spec that cannot be parsed or built; the message says what to write instead."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed ``MODEL`` argument: ``kind`` is torchvision, timm, hf or file."""

    text: str
    kind: str
    name: str  # model name, Hugging Face directory, or Python file
    factory: str | None = None
    weights: str | None = None

    @property
    def takes_text(self) -> bool:
        return self.kind == "hf"


@dataclasses.dataclass
class BuiltModel:
    """A model in eval mode, with what the calibration data must look like for it."""

    spec: ModelSpec
    model: nn.Module
    channels: int | None = None  # image channels the first convolution expects
    image_size: int | None = None  # the model's native input size, when it has one
    mean: tuple[float, ...] | None = None  # normalisation of [0, 1] pixels
    std: tuple[float, ...] | None = None
    tokenizer: Any = None  # hf models: loaded on demand by calibration sources
    vocab_size: int | None = None
    input_shape: tuple[int, ...] | None = None  # one sample of a non-image model (no batch dimension)
    input_shape_origin: str | None = None  # where input_shape came from, for messages and reports


def parse_model_spec(text: str, weights: str | None = None) -> ModelSpec:
    """Split ``text`` into kind and name and check the parts that exist on disk.

    ``weights`` (a state_dict file) applies to torchvision, timm and file models.

    Example:
        >>> parse_model_spec("timm:convnext_femto").kind
        'timm'
        >>> parse_model_spec("torchvision:resnet18", weights="/nonexistent.pt")
        Traceback (most recent call last):
        ...
        fxdeco.cli.model_specs.ModelSpecError: weights file /nonexistent.pt not found
    """
    prefix, sep, rest = text.partition(":")
    if sep and prefix in KINDS:
        if not rest:
            raise ModelSpecError(f"model spec {text!r} names no model after '{prefix}:'; {USAGE}")
        spec = ModelSpec(text, prefix, rest, weights=weights)
    else:
        path, sep, factory = text.rpartition(":")
        if not sep or not path.endswith(".py") or not factory:
            raise ModelSpecError(f"unknown model spec {text!r}: {USAGE}")
        if not factory.isidentifier():
            raise ModelSpecError(f"{factory!r} in model spec {text!r} is not a Python function name")
        if not pathlib.Path(path).is_file():
            raise ModelSpecError(f"model file {path} not found (model spec {text!r})")
        spec = ModelSpec(text, "file", path, factory, weights)
    if weights is not None:
        if spec.kind == "hf":
            raise ModelSpecError("hf: models load their weights from their directory; drop --weights")
        if not pathlib.Path(weights).is_file():
            raise ModelSpecError(f"weights file {weights} not found")
    if spec.kind == "hf" and not (pathlib.Path(spec.name) / "config.json").is_file():
        raise ModelSpecError(f"{spec.name} is not a local Hugging Face model directory (no config.json); "
                             "hf:DIR takes a directory saved by save_pretrained")
    return spec


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


def _shape_of(value: Any, where: str) -> tuple[int, ...]:
    """``value`` (a positive int, or a tuple/list of them) as a per-sample shape."""
    dims = (value,) if isinstance(value, int) else value
    if not (isinstance(dims, (tuple, list)) and dims
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)):
        raise ModelSpecError(f"{where} is {value!r}; give the shape of one sample (no batch dimension) as "
                             "positive integers, e.g. (32,) or (3, 224, 224)")
    return tuple(dims)


def _first_linear_features(model: nn.Module) -> int | None:
    """``in_features`` when the first module that holds parameters is an ``nn.Linear``, and there is no convolution.

    Example:
        >>> _first_linear_features(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
        32
        >>> _first_linear_features(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))) is None
        True
    """
    if _first_conv_channels(model) is not None:
        return None
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            return module.in_features if isinstance(module, nn.Linear) else None
    return None


def _input_shape(module: Any, model: nn.Module, spec: ModelSpec) -> tuple[tuple[int, ...] | None, str | None]:
    """The per-sample input shape a factory model declares or implies, and where it comes from."""
    if getattr(model, "example_input_shape", None) is not None:
        where = f"the example_input_shape of the model {spec.factory}() returns"
        return _shape_of(model.example_input_shape, where), where
    if getattr(module, "example_input_shape", None) is not None:
        where = f"example_input_shape in {spec.name}"
        return _shape_of(module.example_input_shape, where), where
    features = _first_linear_features(model)
    if features is not None:
        return (features,), f"guessed from the model's first layer, an nn.Linear with in_features {features}"
    return None, None


def _torchvision(spec: ModelSpec) -> BuiltModel:
    import torchvision

    known = torchvision.models.list_models()
    if spec.name not in known:
        raise ModelSpecError(f"torchvision has no model {spec.name!r}{_suggest(spec.name, known)}")
    model = torchvision.models.get_model(spec.name, weights=None)
    return BuiltModel(spec, model, _first_conv_channels(model) or 3, 224, IMAGENET_MEAN, IMAGENET_STD)


def _timm(spec: ModelSpec) -> BuiltModel:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError("timm: models need the timm package: pip install timm") from exc
    if not timm.is_model(spec.name):
        raise ModelSpecError(f"timm has no model {spec.name!r}{_suggest(spec.name, timm.list_models())}")
    model = timm.create_model(spec.name, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return BuiltModel(spec, model, size[0], size[-1], tuple(cfg.get("mean", IMAGENET_MEAN)),
                      tuple(cfg.get("std", IMAGENET_STD)))


def _hf(spec: ModelSpec) -> BuiltModel:
    # Offline before transformers is imported: it reads these once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelSpecError("hf: models need the transformers package: pip install transformers") from exc
    hf_logging.disable_progress_bar()  # stderr is for warnings and the one-line error
    model = AutoModel.from_pretrained(spec.name, local_files_only=True)
    return BuiltModel(spec, model, vocab_size=getattr(model.config, "vocab_size", None))


def _file(spec: ModelSpec) -> BuiltModel:
    path = pathlib.Path(spec.name).resolve()
    module_name = f"fxdeco_user_model_{abs(hash(str(path)))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up here
    loader_spec.loader.exec_module(module)
    factory = getattr(module, spec.factory or "", None)
    if not callable(factory):
        raise ModelSpecError(f"{spec.name} has no function {spec.factory!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec.text} returned {type(model).__name__}, not an nn.Module")
    shape, origin = _input_shape(module, model, spec)
    return BuiltModel(spec, model, _first_conv_channels(model), input_shape=shape, input_shape_origin=origin)


def _load_weights(model: nn.Module, file: str) -> None:
    """Load a state_dict file (safetensors, or torch.save of a state_dict / a checkpoint holding one)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelSpecError(f"weights file {file} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    problems = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "wrong shape": [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
                        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape],
    }
    parts = [f"{what} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "") for what, keys in problems.items()
             if keys]
    if parts:
        raise ModelSpecError(f"weights file {file} does not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def build_model(spec: ModelSpec) -> BuiltModel:
    """Build the model ``spec`` names, in eval mode, with its weights file loaded if one was given.

    Example:
        >>> built = build_model(parse_model_spec("torchvision:resnet18"))
        >>> built.channels, built.image_size, built.model.training
        (3, 224, False)
    """
    builders = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "file": _file}
    built = builders[spec.kind](spec)
    if spec.weights is not None:
        _load_weights(built.model, spec.weights)
        log.info("loaded weights from %s", spec.weights)
    elif spec.kind in ("torchvision", "timm"):
        log.info("%s has random weights (no weights file given)", spec.text)
    built.model.eval()
    return built


def describe_weights(spec: ModelSpec) -> str:
    """One phrase on where the weights came from, for reports.

    Example:
        >>> describe_weights(parse_model_spec("torchvision:resnet18"))
        'random weights (no weights file given)'
    """
    if spec.weights is not None:
        return f"weights from {spec.weights}"
    if spec.kind == "hf":
        return f"weights from {spec.name}"
    if spec.kind == "file":
        return f"weights as {spec.factory}() builds them"
    return "random weights (no weights file given)"
