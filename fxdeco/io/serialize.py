"""``fxdeco.save`` / ``fxdeco.load``: a decomposed model as a plan (JSON) plus its weights.

A decomposed GraphModule cannot be rebuilt by ``load_state_dict`` on the
original class: its factored layers are new modules. So :func:`save` writes a
directory holding

* ``plan.json`` -- what was done to which layer: per decomposed layer its
  target, kind, weight shape, rank, full rank, factor shapes, whether the
  second factor carries a bias, for a conv which factor carries the layer's
  kernel geometry (``conv_order``: falor's ``"kxk-first"`` or lockd's default
  ``"1x1-first"``) and the per-layer metadata; the layers kept
  dense, the skipped ones and why, the totals, method, options and how the
  model was captured (the spirit of ptdeco's ``decompose_config``);
* the weights, every tensor of the decomposed model's state_dict:
  ``weights.safetensors`` when ``safetensors`` is importable, else ``weights.pt``
  (``torch.save``); ``plan.json`` records which.

:func:`load` first checks the plan against its weights (each decomposed layer's
rank, full rank, weight shape and conv order must be those of its factor
tensors), then captures a freshly built *original* model the same way, checks
the plan fits it (the first mismatch is named), factorizes the same layers
with placeholder factors of the recorded shapes and loads the weights
strictly, so the result computes exactly what the saved model computed.

Example:
    >>> import tempfile, torch, fxdeco
    >>> from fxdeco.io.serialize import load, save
    >>> def build():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> small = fxdeco.transform(build(), [torch.randn(32, 3) @ torch.randn(3, 16)], nsr_threshold=0.01)
    >>> folder = save(small, tempfile.mkdtemp() + "/small")
    >>> again = load(folder, build())
    >>> x = torch.randn(5, 16)
    >>> torch.equal(again(x), small(x))
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from types import ModuleType
from typing import Any, Mapping

import torch
import torch.fx
from torch import nn

from fxdeco.capture import trace
from fxdeco.errors import warn_user
from fxdeco.metadata import (FactorInfo, ModelRecord, factor_info, factored_layers, find_model_record, model_record,
                             set_model_record)
from fxdeco.methods.lockd.branch import full_rank as factored_full_rank
from fxdeco.plan import LayerDecision
from passes import Factorization, Site, SkippedSite, factorize_sites, find_sites, remove_dead_sites
from passes.capture import copy_graph
from passes.chains import replace_sites_with_chains
from passes.rewrite import factor_layers
from passes.sites import fetch_attr

log = logging.getLogger(__name__)

SCHEMA = "fxdeco.plan"
SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
CONV_ORDERS = ("kxk-first", "1x1-first")
WEIGHT_FILES = {"safetensors": "weights.safetensors", "torch": "weights.pt"}


class PlanError(ValueError):
    """A saved plan cannot be used (base class of the errors below)."""


class PlanFormatError(PlanError):
    """``plan.json`` (or the weights file) is corrupted, foreign, or of an unsupported schema version."""


class PlanMismatchError(PlanError):
    """The plan does not fit the model it is applied to, or the weights saved with it; the message names the first
    mismatch."""


class PlanNotFoundError(FileNotFoundError):
    """The directory, its ``plan.json`` or the weights file it names does not exist."""


# ----------------------------------------------------------------------------------------------- save


def _safetensors() -> ModuleType | None:
    """``safetensors.torch`` when installed, else None (weights then go through ``torch.save``)."""
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tuples become lists, one-element tensors numbers, the rest strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    log.debug("plan.json stores %r as a string", value)
    return str(value)


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with one key per line but lists of numbers (shapes) on one line, so a plan stays readable."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value)


def _decomposed_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Layer name -> the node the rewrite left for it (the second factor; one per layer)."""
    found: dict[str, torch.fx.Node] = {}
    for node, info in factored_layers(gm):
        found.setdefault(info.target, node)
    return found


def _site_record(gm: torch.fx.GraphModule, node: torch.fx.Node, decision: LayerDecision) -> dict[str, Any]:
    """Everything :func:`load` needs to rebuild one factored layer, read off the installed modules."""
    module = node.target[: -len(".1")]
    first, second = gm.get_submodule(f"{module}.0"), gm.get_submodule(f"{module}.1")
    info = factor_info(node)
    record: dict[str, Any] = {
        "target": decision.target,
        "module": module,
        "kind": decision.kind,
        "weight_shape": list(decision.weight_shape),
        "rank": first.weight.shape[0],
        "full_rank": decision.full_rank,
        "first_shape": list(first.weight.shape),
        "second_shape": list(second.weight.shape),
        "second_bias": second.bias is not None,
        "layer_bias": info.params_before > math.prod(decision.weight_shape),
        "metadata": _jsonable(info.method_meta),
    }
    if decision.kind == "conv2d":
        record["conv_order"] = conv_order(first, second)
    return record


def _has_geometry(conv: nn.Module) -> bool:
    """Whether a factor conv does more than a plain 1x1 map (kernel, stride, padding or dilation)."""
    def pair(v: Any) -> tuple:
        return (v, v) if isinstance(v, int) else tuple(v)
    plain_padding = conv.padding in ("valid", "same") or pair(conv.padding) == (0, 0)  # both are none for 1x1
    return pair(conv.kernel_size) != (1, 1) or pair(conv.stride) != (1, 1) or pair(conv.dilation) != (1, 1) or \
        not plain_padding


def conv_order(first: nn.Module, second: nn.Module) -> str:
    """Which factor of a factored conv carries the layer's kernel and geometry.

    ``"kxk-first"`` (falor; also when neither does, e.g. a plain 1x1 layer,
    where both orders compute the same) or ``"1x1-first"`` (lockd's default:
    a 1x1 conv to the rank, then the layer's kxk conv).

    Example:
        >>> conv_order(nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(2, 4, 1))
        'kxk-first'
        >>> conv_order(nn.Conv2d(8, 2, 1), nn.Conv2d(2, 4, 3, padding=1))
        '1x1-first'
        >>> conv_order(nn.Conv2d(8, 2, 1), nn.Conv2d(2, 4, 1, stride=2))
        '1x1-first'
    """
    return "1x1-first" if _has_geometry(second) and not _has_geometry(first) else "kxk-first"


def _geometry_factor(gm: torch.fx.GraphModule, record: dict[str, Any]) -> nn.Module:
    """The factor conv that carries the layer's stride, padding and dilation."""
    index = 1 if record.get("conv_order") == "1x1-first" else 0
    return gm.get_submodule(f"{record['module']}.{index}")


def _geometry(stride: Any, padding: Any, dilation: Any) -> dict[str, Any]:
    """A conv's stride, padding and dilation as JSON, ``1`` and ``(1, 1)`` alike (``"same"`` stays a string)."""
    def pair(v: Any) -> Any:
        return [v, v] if isinstance(v, int) else v if isinstance(v, str) else [int(x) for x in v]
    return {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation)}


def _inputs(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """Name, shape (symbolic sizes as names) and dtype of each graph input, when the capture recorded them."""
    described = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            entry: dict[str, Any] = {"name": node.name}
            if isinstance(val, torch.Tensor):
                entry["shape"] = [d if isinstance(d, int) else str(d) for d in val.shape]
                entry["dtype"] = str(val.dtype).removeprefix("torch.")
            described.append(entry)
    return described


def plan_dict(gm: torch.fx.GraphModule, weights_format: str = "safetensors") -> dict[str, Any]:
    """The content of ``plan.json`` for a GraphModule returned by ``fxdeco.convert``/``transform``.

    Example:
        >>> import torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> small = fxdeco.transform(model, [torch.randn(16, 2) @ torch.randn(2, 8)], nsr_threshold=0.01)
        >>> plan = plan_dict(small)
        >>> plan["schema"], [(s["target"], s["rank"], s["first_shape"]) for s in plan["sites"]]
        ('fxdeco.plan', [('0', 2, [2, 8])])
    """
    info = model_record(_decomposed(gm), purpose="save()")
    decisions = info.decisions
    nodes = _decomposed_nodes(gm)
    dense = {s.target: s for s in find_sites(gm)[0]}
    sites, geometry = [], {}
    for d in decisions:
        if d.decomposed:
            if d.target not in nodes:
                raise ValueError(f"layer {d.target!r} is decomposed according to the model's record but the graph has "
                                 "no factored node for it; was the graph edited after fxdeco.convert?")
            sites.append(_site_record(gm, nodes[d.target], d))
            if d.kind == "conv2d":
                factor = _geometry_factor(gm, sites[-1])
                geometry[d.target] = _geometry(factor.stride, factor.padding, factor.dilation)
        elif d.kind == "conv2d" and d.target in dense:
            s = dense[d.target]
            geometry[d.target] = _geometry(s.stride, s.padding, s.dilation)
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "method": info.method,
        "capture": info.capture,
        # inputs traced as their constant default (fxdeco.trace): load() must trace the same case
        "constant_inputs": _jsonable(info.constant_inputs),
        # modules and functions symbolic tracing kept whole (leaf_modules=, autowrap_functions=): load() keeps them
        **_traced_whole(gm),
        "options": _jsonable(info.options),
        "inputs": _inputs(gm),
        "training": gm.training,
        "sites": sites,
        "decisions": [_jsonable(d.as_dict()) for d in decisions],
        "conv_geometry": geometry,
        "skipped": [{"target": k.target, "node": k.node, "reason": k.reason} for k in info.skipped],
        "removed": list(info.removed),
        "totals": _jsonable(info.totals()),
        "weights": {"file": WEIGHT_FILES[weights_format], "format": weights_format},
        "graph": graph_signature(gm),  # load() compares the model it rebuilds (absent in older files)
        "graph_inputs_by_name": graph_signature(gm, inputs_by_name=True),  # the same, whatever the inputs' order
    }


def graph_signature(gm: torch.fx.GraphModule, inputs_by_name: bool = False) -> str:
    """A digest of the graph's computation: each node's kind, what it calls (a module: its name and class) and
    which earlier nodes it reads (names of nodes left out: they are the capture's choice). Saved in ``plan.json`` so
    that :func:`load` can tell a model of other code (the same layers wired differently) from the one saved.

    ``inputs_by_name=True`` numbers the graph's inputs in the order of their names, not in the graph's: a model
    exported again from keyword inputs given in another order (``{"attention_mask": ..., "input_ids": ...}``) is
    the same computation, and its inputs keep their names.

    Example:
        >>> import torch
        >>> a = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> b = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
        >>> graph_signature(a) == graph_signature(a), graph_signature(a) == graph_signature(b)
        (True, False)
    """
    nodes = list(gm.graph.nodes)
    if inputs_by_name:
        inputs = sorted((n for n in nodes if n.op == "placeholder"), key=lambda n: n.name)
        nodes = inputs + [n for n in nodes if n.op != "placeholder"]
    position = {node: i for i, node in enumerate(nodes)}
    lines = []
    for node in nodes:
        target = node.target if isinstance(node.target, str) else torch.fx.node._get_qualified_name(node.target)
        if node.op == "placeholder":
            target = ""  # an input's name is the capture's choice
        elif node.op == "call_module":
            target += f" {type(gm.get_submodule(node.target)).__qualname__}"  # an nn.ReLU replaced by an nn.Tanh
        reads = [position[n] for n in node.all_input_nodes]
        if inputs_by_name and node.op == "call_module" and node.target == "_guards_fn":
            reads.sort()  # torch.export's guard check reads every input in the graph's order
        lines.append(f"{node.op} {target} {reads}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _decomposed(gm: Any) -> torch.fx.GraphModule:
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"save() expects the GraphModule returned by fxdeco.transform/convert, got {type(gm).__name__}")
    return gm


def _weights_to_save(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The state_dict as standalone CPU tensors (safetensors refuses tensors that share memory)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in gm.state_dict().items():
        t = t.detach().cpu()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not whole or t.untyped_storage().data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)  # a tied weight is stored twice
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors


def _ordinary_mode() -> int:
    """The permissions ``open()`` gives a new file: ``0o666`` less the process umask.

    Example:
        >>> previous = os.umask(0o022)
        >>> oct(_ordinary_mode())
        '0o644'
        >>> _ = os.umask(previous)
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace(target: pathlib.Path, write: Any) -> None:
    """Write through a temporary file then rename, so a crash never leaves half a file under ``target``.

    Every file :func:`save` writes goes through here and ends up with ordinary
    permissions (:func:`_ordinary_mode`), whatever ``write`` did: mkstemp
    makes the temporary file private, and a writer may replace it with a
    private file of its own (safetensors' ``save_file`` does).
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _ordinary_mode())  # after writing: a saved model is an ordinary file
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _directory(path: str | os.PathLike) -> pathlib.Path:
    folder = pathlib.Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} exists and is not a directory; fxdeco saves a model as a "
                                 "directory (plan.json + weights): give a new or existing directory path")
    return folder


def save(gm: torch.fx.GraphModule, path: str | os.PathLike) -> pathlib.Path:
    """Write ``plan.json`` and the weights of a decomposed GraphModule into directory ``path``.

    ``path`` is created if absent; files of an earlier save there are
    replaced. Returns the directory. Re-apply with :func:`load`.

    Example:
        >>> import tempfile, torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> small = fxdeco.transform(model, [torch.randn(16, 2) @ torch.randn(2, 8)], nsr_threshold=0.01)
        >>> folder = save(small, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['plan.json', 'weights.safetensors']
    """
    model_record(_decomposed(gm), purpose="save()")  # only a decomposed model has a plan to save
    folder = _directory(path)
    folder.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    fmt = "safetensors" if st is not None else "torch"
    plan = plan_dict(gm, fmt)
    tensors = _weights_to_save(gm)
    if st is not None:
        _replace(folder / WEIGHT_FILES[fmt], lambda tmp: st.save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        _replace(folder / WEIGHT_FILES[fmt], lambda tmp: torch.save(tensors, tmp))
    stale = folder / WEIGHT_FILES["torch" if fmt == "safetensors" else "safetensors"]
    if stale.is_file():  # an earlier save in the other format: the plan no longer names it
        stale.unlink()
    # The plan goes last: a directory with a plan always has the weights it names.
    text = _dumps(plan) + "\n"
    _replace(folder / PLAN_FILE, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    log.info("saved %d decomposed layers and %d tensors to %s", len(plan["sites"]), len(tensors), folder)
    return folder


# ----------------------------------------------------------------------------------------------- load


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``plan.json`` in directory ``path`` (schema name, version, sections).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "plan.json").write_text('{"schema": "fxdeco.plan", "version": 99}')
        >>> read_plan(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxdeco.io.serialize.PlanFormatError: ... has schema version 99; this fxdeco reads version 1: save the model \
again with this version of fxdeco, or upgrade fxdeco
    """
    folder = _directory(path)
    file = folder / PLAN_FILE
    if not folder.exists():
        raise PlanNotFoundError(f"no saved model at {str(folder)!r}: the directory does not exist")
    if not file.is_file():
        raise PlanNotFoundError(f"{str(folder)!r} holds no {PLAN_FILE}; give the directory written by fxdeco.save")
    try:
        plan = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanFormatError(f"{str(file)!r} is not valid JSON ({exc}); the file is corrupted: save the model "
                              "again") from exc
    if not isinstance(plan, dict) or plan.get("schema") != SCHEMA:
        found = plan.get("schema") if isinstance(plan, dict) else type(plan).__name__
        raise PlanFormatError(f"{str(file)!r} is not an fxdeco plan (schema {found!r}, expected {SCHEMA!r}); "
                              "give the directory written by fxdeco.save")
    if plan.get("version") != SCHEMA_VERSION:
        raise PlanFormatError(f"{str(file)!r} has schema version {plan.get('version')!r}; this fxdeco reads version "
                              f"{SCHEMA_VERSION}: save the model again with this version of fxdeco, or upgrade fxdeco")
    _check_sections(plan, file)
    return plan


_SECTIONS: dict[str, type | tuple[type, ...]] = {
    "capture": str, "sites": list, "decisions": list, "skipped": list, "removed": list, "totals": dict,
    "weights": dict, "options": dict, "conv_geometry": dict,
}
_SITE_FIELDS = ("target", "module", "kind", "weight_shape", "rank", "first_shape", "second_shape", "second_bias",
                "layer_bias", "metadata")


def _check_sections(plan: dict[str, Any], file: pathlib.Path) -> None:
    for key, kind in _SECTIONS.items():
        if not isinstance(plan.get(key), kind):
            raise PlanFormatError(f"{str(file)!r} lacks a valid {key!r} section; the file is damaged: save the model "
                                  "again")
    for i, record in enumerate(plan["sites"]):
        missing = [f for f in _SITE_FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise PlanFormatError(f"{str(file)!r}: decomposed layer #{i} lacks {', '.join(missing)}; the file is "
                                  "damaged: save the model again")
    if plan["weights"].get("format") not in WEIGHT_FILES or not isinstance(plan["weights"].get("file"), str):
        raise PlanFormatError(f"{str(file)!r} names weights {plan['weights']!r}; expected format "
                              f"{' or '.join(WEIGHT_FILES)}")


def _weights_file(folder: pathlib.Path, plan: dict[str, Any]) -> pathlib.Path:
    file = folder / plan["weights"]["file"]
    if not file.is_file():
        raise PlanNotFoundError(f"the weights file {str(file)!r} named by {PLAN_FILE} is missing; copy the whole "
                                "directory written by fxdeco.save, or save the model again")
    return file


def _read_weights(file: pathlib.Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if fmt == "safetensors":
            st = _safetensors()
            if st is None:
                raise PlanError(f"{str(file)!r} is a safetensors file but safetensors is not installed; "
                                "pip install safetensors")
            return st.load_file(str(file), device="cpu")
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except PlanError:
        raise
    except Exception as exc:  # each format fails in its own way on a damaged file
        raise PlanFormatError(f"could not read the weights {str(file)!r} ({type(exc).__name__}: {exc}); the file "
                              "is damaged: save the model again") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise PlanFormatError(f"{str(file)!r} does not hold a dict of tensors; save the model again")
    return tensors


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', None) or type(obj).__name__}"


def _traced_whole(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """The classes of the modules and the functions a symbolic graph calls without having traced into them beyond
    torch's own: those ``leaf_modules=`` / ``autowrap_functions=`` (or timm's no-trace registries) named. A graph
    traced into them is another graph, and a module whose forward cannot be traced fails to load at all.

    Example:
        >>> class Gate(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), Gate())
        >>> _traced_whole(trace(net, leaf_modules=(Gate,)))["leaf_modules"]
        ['fxdeco.io.serialize.Gate']
    """
    tracer = torch.fx.Tracer()
    leaves, functions = set(), set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not tracer.is_leaf_module(module, node.target):
                leaves.add(_qualified_name(type(module)))
        elif node.op == "call_function" and callable(node.target) and not isinstance(node.target, type):
            home = getattr(node.target, "__module__", None) or ""
            if home.split(".")[0] not in ("torch", "operator", "builtins", "math", "_operator", "fxdeco", "passes"):
                functions.add(_qualified_name(node.target))
    return {"leaf_modules": sorted(leaves), "autowrap_functions": sorted(functions)}


def _kept_whole(model: nn.Module, plan: dict[str, Any], leaf_modules: Any, autowrap_functions: Any
                ) -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """The leaf module classes and wrapped functions to trace ``model`` with: those given, and those the plan
    names, found among ``model``'s own module classes and by import (the rest must be given)."""
    leaves, wrapped = list(leaf_modules), list(autowrap_functions)
    if plan["capture"] != "symbolic":
        return tuple(leaves), tuple(wrapped)
    classes = {_qualified_name(type(m)): type(m) for m in model.modules()}
    given = {_qualified_name(x) for x in (*leaves, *wrapped)}
    missing = []
    for name in plan.get("leaf_modules") or []:  # absent from plans saved before it was recorded
        if name in given:
            continue
        if name in classes:
            leaves.append(classes[name])
        else:
            missing.append(name)
    for name in plan.get("autowrap_functions") or []:
        if name in given:
            continue
        found = _import_qualified(name)
        if found is not None:
            wrapped.append(found)
        else:
            missing.append(name)
    if missing:  # a function of a script's __main__ or a local class: the caller can still pass it
        log.info("the plan names %s, kept whole when the model was traced, which load() could not find; "
                 "pass them as leaf_modules=/autowrap_functions=", ", ".join(missing))
    return tuple(leaves), tuple(wrapped)


def _import_qualified(name: str) -> Any:
    """The object ``module.qualname`` names, when its module is already imported; None otherwise."""
    import sys

    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _capture(model: nn.Module, plan: dict[str, Any], example_inputs: Any,
             leaf_modules: Any = (), autowrap_functions: Any = ()) -> torch.fx.GraphModule:
    """Capture ``model`` the way the saved model was captured; a private copy (the caller's stays untouched)."""
    mode = plan["capture"]
    if mode == "export" and example_inputs is None:
        shapes = ", ".join(f"{i['name']}: {i.get('dtype', '?')} {tuple(i.get('shape', ()))}"
                           for i in plan.get("inputs", []) if isinstance(i, dict))
        raise PlanError("this model was captured with torch.export, so load() must capture it again: pass "
                        f"example_inputs=... (a batch the model accepts{'; inputs: ' + shapes if shapes else ''})")
    if mode not in ("symbolic", "export"):
        # convert() was given a GraphModule: re-apply to the same kind of graph
        log.info("plan captured as %r; capturing the model with capture='auto'", mode)
        mode = "auto"
    constants = plan.get("constant_inputs")  # absent from plans saved before it was recorded
    leaves, wrapped = _kept_whole(model, plan, leaf_modules, autowrap_functions)
    gm = copy_graph(trace(model, example_inputs, capture=mode, leaf_modules=leaves, autowrap_functions=wrapped,
                          constant_inputs=constants if isinstance(constants, dict) else None))
    remove_dead_sites(gm)  # as fxdeco.prepare did
    return gm


def _shape(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _dims(shape: Any) -> str:
    """``(16, 64) -> '16x64'``; anything but a shape as its repr."""
    if isinstance(shape, (list, tuple, torch.Size)):
        return "x".join(str(d) for d in shape)
    return repr(shape)


def _is_count(value: Any) -> bool:
    """A positive int (``True`` is not a rank)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def factor_shapes(kind: str, weight_shape: tuple[int, ...], rank: int,
                  order: str = "kxk-first") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The weight shapes of the two factors of a ``kind`` layer with weight ``weight_shape`` at ``rank``.

    A Linear ``(out, in)`` becomes ``(rank, in)`` then ``(out, rank)``; a Conv2d
    ``(out, in, kh, kw)`` its kxk conv then a 1x1 conv (``order="kxk-first"``)
    or a 1x1 conv then its kxk conv (``"1x1-first"``).

    Example:
        >>> factor_shapes("linear", (32, 64), 8)
        ((8, 64), (32, 8))
        >>> factor_shapes("conv2d", (32, 16, 3, 3), 8)
        ((8, 16, 3, 3), (32, 8, 1, 1))
        >>> factor_shapes("conv2d", (32, 16, 3, 3), 8, "1x1-first")
        ((8, 16, 1, 1), (32, 8, 3, 3))
    """
    out, cin, *kernel = weight_shape
    if kind == "linear":
        return (rank, cin), (out, rank)
    if order == "1x1-first":
        return (rank, cin, 1, 1), (out, rank, *kernel)
    return (rank, cin, *kernel), (out, rank, 1, 1)


_NOT_TOGETHER = ("the plan and the weights do not belong together: keep plan.json with the weights file saved next "
                 "to it, or save the model again")


def _check_factors(plan: dict[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    """Check the plan's decomposed layers against their factor tensors, before anything is built.

    The factors in the weights file are what the saved model computed, so
    for each decomposed layer the plan's rank (under 'sites' and under
    'decisions', which ``fxdeco.report`` shows), full rank, weight shape
    (out/in features, kernel), conv order, factor shapes and bias must be
    theirs; the layer's tensors must all be there and no other tensor may
    sit among them. Raises :class:`PlanMismatchError` naming the first
    layer and fact that disagree (:class:`PlanFormatError` for a damaged plan).

    Example:
        >>> plan = {"weights": {"file": "weights.safetensors"}, "decisions": [{"target": "fc1", "rank": 12}],
        ...         "sites": [{"target": "fc1", "module": "fc1", "kind": "linear", "weight_shape": [32, 64],
        ...                    "rank": 12, "first_shape": [16, 64], "second_shape": [32, 16], "second_bias": False}]}
        >>> _check_factors(plan, {"fc1.0.weight": torch.zeros(16, 64), "fc1.1.weight": torch.zeros(32, 16)})
        Traceback (most recent call last):
        ...
        fxdeco.io.serialize.PlanMismatchError: layer 'fc1': plan.json says rank 12 but its factors in \
weights.safetensors have rank 16 (first factor 16x64); the plan and the weights do not belong together: keep \
plan.json with the weights file saved next to it, or save the model again
    """
    file = plan["weights"]["file"]
    if not all(isinstance(r["target"], str) for r in plan["sites"]):
        raise PlanFormatError(f"{PLAN_FILE}: a decomposed layer under 'sites' lacks its target; save the model again")
    records = {r["target"]: r for r in plan["sites"]}
    decomposed = set()
    for d in plan["decisions"]:
        target = d.get("target") if isinstance(d, dict) else None
        if not isinstance(target, str):
            raise PlanFormatError(f"{PLAN_FILE}: a decision lacks its target; save the model again")
        if d.get("rank") is None:
            continue
        if target not in records:
            raise PlanFormatError(f"{PLAN_FILE}: layer {target!r} is decomposed but has no entry in 'sites'; "
                                  "save the model again")
        decomposed.add(target)
        _check_layer_factors(f"layer {target!r}", d, records[target], weights, file)
    for target in records:
        if target not in decomposed:
            raise PlanMismatchError(f"layer {target!r}: {PLAN_FILE} keeps it dense (no rank under 'decisions') but "
                                    f"lists its factors under 'sites'; the plan was edited: give the layer its rank "
                                    "back, or save the model again")


def _check_layer_factors(what: str, decision: dict[str, Any], record: dict[str, Any],
                         weights: Mapping[str, torch.Tensor], file: str) -> None:
    """One decomposed layer of :func:`_check_factors`: its plan entries against its tensors."""
    kind, order = record["kind"], record.get("conv_order", "kxk-first")
    if order not in CONV_ORDERS:
        raise PlanFormatError(f"{PLAN_FILE}: {what} has conv_order {order!r}, expected one of {CONV_ORDERS}; save the "
                              "model again")
    if kind not in ("linear", "conv2d"):
        raise PlanFormatError(f"{PLAN_FILE}: {what} has kind {kind!r} under 'sites', expected 'linear' or 'conv2d'; "
                              "save the model again")
    ndim = 2 if kind == "linear" else 4
    weight_shape = record["weight_shape"]
    if not isinstance(weight_shape, list) or len(weight_shape) != ndim or not all(map(_is_count, weight_shape)):
        raise PlanFormatError(f"{PLAN_FILE}: {what} has weight_shape {weight_shape!r} under 'sites', expected {ndim} "
                              f"positive integers for a {kind} layer; save the model again")
    weight_shape = tuple(weight_shape)
    module = record["module"]
    names = [f"{module}.0.weight", f"{module}.1.weight"] + ([f"{module}.1.bias"] if record["second_bias"] else [])
    missing = [n for n in names if n not in weights]
    if missing:
        raise PlanMismatchError(f"{what}: {PLAN_FILE} needs the factor tensor {missing[0]!r}, which {file} does not "
                                f"hold; {_NOT_TOGETHER}")
    extra = sorted(n for n in weights if n.startswith(f"{module}.") and n not in names)
    if extra:
        raise PlanMismatchError(f"{what}: {file} holds {extra[0]!r} among the layer's factors, which {PLAN_FILE} does "
                                f"not expect (it expects {', '.join(names)}); {_NOT_TOGETHER}")
    first, second = weights[names[0]], weights[names[1]]
    if first.dim() != ndim or second.dim() != ndim:
        raise PlanMismatchError(f"{what}: {PLAN_FILE} says a {kind} layer but its factors in {file} are "
                                f"{_dims(first.shape)} and {_dims(second.shape)}; {_NOT_TOGETHER}")
    rank = first.shape[0]
    for entry in (record, decision):
        if not _is_count(entry["rank"]):
            raise PlanMismatchError(f"{what}: {PLAN_FILE} says rank {entry['rank']!r}, not a positive integer, but "
                                    f"its factors in {file} have rank {rank} (first factor {_dims(first.shape)}); "
                                    f"{_NOT_TOGETHER}")
        if entry["rank"] != rank:
            raise PlanMismatchError(f"{what}: {PLAN_FILE} says rank {entry['rank']} but its factors in {file} have "
                                    f"rank {rank} (first factor {_dims(first.shape)}); {_NOT_TOGETHER}")
    if second.shape[1] != rank:
        raise PlanFormatError(f"{what}: its factors in {file} do not chain: the first ({_dims(first.shape)}) gives "
                              f"{rank} channels, the second ({_dims(second.shape)}) takes {second.shape[1]}; the "
                              "weights file is damaged: save the model again")
    layout = f"a {kind} layer of weight {_dims(weight_shape)}" + (f" factored {order}" if kind == "conv2d" else "")
    expected = factor_shapes(kind, weight_shape, rank, order)
    found = (tuple(first.shape), tuple(second.shape))
    if found != expected:
        raise PlanMismatchError(f"{what}: {PLAN_FILE} says {layout}, whose rank-{rank} factors are "
                                f"{_dims(expected[0])} and {_dims(expected[1])}, but its factors in {file} are "
                                f"{_dims(found[0])} and {_dims(found[1])}; {_NOT_TOGETHER}")
    for key, shape in (("first_shape", found[0]), ("second_shape", found[1])):
        if record[key] != list(shape):
            raise PlanMismatchError(f"{what}: {PLAN_FILE} says {key} {_dims(record[key])} but that factor in {file} "
                                    f"is {_dims(shape)}; {_NOT_TOGETHER}")
    bias = weights.get(f"{module}.1.bias")
    if bias is not None and tuple(bias.shape) != (weight_shape[0],):
        raise PlanFormatError(f"{what}: its bias in {file} has shape {_dims(bias.shape)}, not ({weight_shape[0]},) "
                              "like its outputs; the weights file is damaged: save the model again")
    full = factored_full_rank(weight_shape, kind, order)
    for entry in (record, decision):
        if "full_rank" in entry and entry["full_rank"] != full:  # older plans' sites lack it
            raise PlanMismatchError(f"{what}: {PLAN_FILE} says full rank {entry['full_rank']!r} but its factors in "
                                    f"{file} are those of {layout}, of full rank {full}; {_NOT_TOGETHER}")


def _check_layer(what: str, site: Site | None, skipped: SkippedSite | None, kind: str, shape: tuple[int, ...]) -> None:
    """Raise :class:`PlanMismatchError` when the model's layer is absent or unlike the plan's."""
    if site is None:
        if skipped is not None:
            raise PlanMismatchError(f"{what}: the model's layer cannot be decomposed here ({skipped.reason})")
        raise PlanMismatchError(f"{what}: the model has no such Linear/Conv2d layer; build the model the plan was "
                                "made for")
    if site.kind != kind:
        raise PlanMismatchError(f"{what}: the plan has a {kind} layer, the model a {site.kind}")
    if site.weight_shape != shape:
        raise PlanMismatchError(f"{what}: the plan has a {kind} weight of shape {shape}, the model's is "
                                f"{site.weight_shape}; build the model with the configuration the plan was made for")


def _fit(plan: dict[str, Any], sites: list[Site],
         skipped: list[SkippedSite]) -> tuple[dict[str, Factorization], dict[str, dict[str, Any]]]:
    """Check the plan against the model's layers, in graph order; return what to rebuild.

    Layers factored as ``first(kxk) -> second(1x1)`` (the rewrite pass's own
    form) come back as placeholder factorizations; convs factored 1x1-first
    (lockd) as their records, which :func:`_chains` turns into modules.
    """
    by_target = {s.target: s for s in sites}
    skipped_by_target = {k.target: k for k in skipped}
    records = {r["target"]: r for r in plan["sites"]}
    plan_targets = set()
    factors: dict[str, Factorization] = {}
    reversed_order: dict[str, dict[str, Any]] = {}
    for d in plan["decisions"]:  # targets, 'sites' entries and conv orders passed _check_factors
        target = d["target"]
        plan_targets.add(target)
        what = f"layer {target!r}"
        site = by_target.get(target)
        _check_layer(what, site, skipped_by_target.get(target), d.get("kind"), _shape(d.get("weight_shape", ())))
        _check_geometry(what, site, plan["conv_geometry"].get(target))
        if d.get("rank") is not None:
            record = records[target]
            _check_record(what, site, record)
            if site.kind == "conv2d" and record.get("conv_order") == "1x1-first":
                _check_bias(what, site, record)
                reversed_order[target] = record
            else:
                factors[target] = _placeholder(what, site, record)
    unknown = [s.target for s in sites if s.target not in plan_targets and
               s.target not in {k["target"] for k in plan["skipped"]}]
    if unknown:
        raise PlanMismatchError(f"layer {unknown[0]!r}: the model has this layer, the plan does not know it; build "
                                "the model the plan was made for")
    return factors, reversed_order


def _check_record(what: str, site: Site, record: dict[str, Any]) -> None:
    """The layer's 'sites' entry (checked against the weights) describes the model's layer too."""
    if record["kind"] != site.kind or tuple(record["weight_shape"]) != site.weight_shape:
        raise PlanMismatchError(f"{what}: {PLAN_FILE} lists factors (under 'sites') for a {record['kind']} weight of "
                                f"shape {_dims(record['weight_shape'])}, the model's layer is a {site.kind} of shape "
                                f"{_dims(site.weight_shape)}; the plan was edited: save the model again")


def _check_geometry(what: str, site: Site, recorded: dict[str, Any] | None) -> None:
    """A conv with the same weight but another stride/padding/dilation computes something else."""
    if site.kind != "conv2d" or recorded is None:
        return
    found = _geometry(site.stride, site.padding, site.dilation)
    if found != recorded:
        raise PlanMismatchError(f"{what}: the plan's convolution has {recorded}, the model's {found}")


def _check_bias(what: str, site: Site, record: dict[str, Any]) -> None:
    if record["layer_bias"] != (site.bias is not None):
        has = "has" if site.bias is not None else "has no"
        raise PlanMismatchError(f"{what}: the model's layer {has} bias, unlike the plan's")


def _placeholder(what: str, site: Site, record: dict[str, Any]) -> Factorization:
    """Zero factors of the recorded shapes; their values come from the weights file."""
    _check_bias(what, site, record)
    first, second = torch.zeros(_shape(record["first_shape"])), torch.zeros(_shape(record["second_shape"]))
    # A bias the method added (falor's centring of a bias-free layer) needs a slot too.
    bias = torch.zeros(site.out_features) if record["second_bias"] and site.bias is None else None
    meta = record["metadata"] if isinstance(record["metadata"], dict) else {}
    return Factorization(first, second, dict(meta), bias)


def _one_by_one_first(gm: torch.fx.GraphModule, site: Site, record: dict[str, Any]) -> nn.Sequential:
    """``Sequential(1x1 conv in -> r, kxk conv r -> out with the layer's geometry)``; weights come from the file."""
    first_shape, second_shape = _shape(record["first_shape"]), _shape(record["second_shape"])
    cin, kernel = site.weight_shape[1], tuple(site.weight_shape[2:])
    rank = first_shape[0]
    if first_shape != (rank, cin, 1, 1) or second_shape != (site.out_features, rank, *kernel):
        raise PlanMismatchError(f"layer {site.target!r}: 1x1-first factors of shapes {first_shape} and "
                                f"{second_shape} do not fit its weight {site.weight_shape}")
    weight = fetch_attr(gm, site.weight)
    return factor_layers(site, rank, order="1x1-first", bias=bool(record["second_bias"]), dtype=weight.dtype,
                         device=weight.device)


def _chains(gm: torch.fx.GraphModule, sites: list[Site], records: dict[str, dict[str, Any]]) -> torch.fx.GraphModule:
    """``gm`` with each layer of ``records`` replaced by its 1x1-first chain (and its node metadata)."""
    if not records:
        return gm
    first_site = {}
    for s in sites:
        first_site.setdefault(s.target, s)
    chains, metas = {}, {}
    for target, record in records.items():
        site = first_site[target]
        chain = _one_by_one_first(gm, site, record)
        chains[target] = chain
        meta = record["metadata"] if isinstance(record["metadata"], dict) else {}
        metas[target] = FactorInfo(target, site.kind, site.weight_shape, chain[0].out_channels,
                                   record.get("full_rank", site.full_rank), site.dense_params,
                                   sum(p.numel() for p in chain.parameters()), dict(meta))
    return replace_sites_with_chains(gm, sites, chains, metas)


def _check_modules(gm: torch.fx.GraphModule, plan: dict[str, Any]) -> None:
    """The rebuilt factors sit where the saved ones did (so their weights find their names)."""
    nodes = _decomposed_nodes(gm)
    for record in plan["sites"]:
        installed = nodes[record["target"]].target[: -len(".1")]
        if installed != record["module"]:
            raise PlanMismatchError(f"layer {record['target']!r}: its factors would go to {installed!r}, the plan's "
                                    f"are at {record['module']!r}")


def _check_weights(gm: torch.fx.GraphModule, weights: dict[str, torch.Tensor]) -> None:
    """Name the first tensor the weights file and the rebuilt model disagree on (name, shape or dtype)."""
    expected = gm.state_dict()
    for name, t in expected.items():
        if name not in weights:
            raise PlanMismatchError(f"the weights file has no tensor {name!r}, which the model needs; build the "
                                    "model the plan was made for")
        w = weights[name]
        if w.shape != t.shape:
            raise PlanMismatchError(f"tensor {name!r}: shape {tuple(w.shape)} in the weights file, "
                                    f"{tuple(t.shape)} in the model")
        if w.dtype != t.dtype:
            raise PlanMismatchError(f"tensor {name!r}: {w.dtype} in the weights file, {t.dtype} in the model; "
                                    f"convert the model first (e.g. model.to({w.dtype}))")
    extra = [name for name in weights if name not in expected]
    if extra:
        raise PlanMismatchError(f"the weights file has tensor {extra[0]!r}, which the model does not; build the "
                                "model the plan was made for")


def _restore_meta(gm: torch.fx.GraphModule, plan: dict[str, Any]) -> None:
    """Rebuild the model's record as fxdeco.convert left it, so ``fxdeco.report`` works on the loaded model."""
    try:
        decisions = [LayerDecision(**{**d, "weight_shape": _shape(d["weight_shape"])}) for d in plan["decisions"]]
        skipped = [SkippedSite(k["node"], k["target"], k["reason"]) for k in plan["skipped"]]
    except (TypeError, KeyError) as exc:
        raise PlanFormatError(f"{PLAN_FILE}: a decision or skipped layer is malformed ({exc}); save the model "
                              "again") from exc
    counts, summary = ModelRecord.split_totals(plan["totals"])
    set_model_record(gm, ModelRecord(
        method=plan.get("method"), options=plan["options"], capture=plan["capture"], decisions=decisions,
        skipped=skipped, removed=list(plan["removed"]), constant_inputs=dict(plan.get("constant_inputs") or {}),
        summary=summary, **counts))


def load(path: str | os.PathLike, model: nn.Module, *, example_inputs: Any = None,
         leaf_modules: Any = (), autowrap_functions: Any = ()) -> torch.fx.GraphModule:
    """Re-apply the plan saved in directory ``path`` to ``model``, a freshly built original; load the weights.

    ``model`` is captured as the saved model was (a plan made with
    ``capture="export"`` needs ``example_inputs``, a batch the model accepts;
    the module classes and functions symbolic tracing kept whole,
    ``leaf_modules=`` / ``autowrap_functions=`` of ``transform``, are recorded
    in the plan and found among ``model``'s modules and by import, else pass them here),
    checked against the plan (:class:`PlanMismatchError` names the first layer
    or tensor that does not fit), factorized with the recorded shapes, and
    given the saved weights, so the result computes bit-exactly what the saved
    GraphModule did. Before any of that the plan is checked against its
    weights: a plan whose ranks or shapes are not those of its factor tensors
    (edited by hand, or paired with another save's weights) is refused.
    ``model`` itself is never modified, whether the load succeeds or fails.

    Example:
        >>> import tempfile, torch, fxdeco
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> small = fxdeco.transform(model, [torch.randn(16, 2) @ torch.randn(2, 8)], nsr_threshold=0.01)
        >>> folder = save(small, tempfile.mkdtemp())
        >>> load(folder, torch.nn.Sequential(torch.nn.Linear(8, 6)))
        Traceback (most recent call last):
        ...
        fxdeco.io.serialize.PlanMismatchError: layer '0': the plan has a linear weight of shape (8, 8), the model's \
is (6, 8); build the model with the configuration the plan was made for
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load() re-applies a plan to a freshly built original model (an nn.Module), got "
                        f"{type(model).__name__}")
    folder = _directory(path)
    plan = read_plan(folder)
    weights = _read_weights(_weights_file(folder, plan), plan["weights"]["format"])
    _check_factors(plan, weights)  # before the (slow) capture: nothing is built from a plan its weights contradict
    gm = _capture(model, plan, example_inputs, leaf_modules, autowrap_functions)  # a private copy: model stays
    sites, skipped = find_sites(gm)
    try:
        factors, reversed_order = _fit(plan, sites, skipped)
    except PlanMismatchError as exc:
        if find_model_record(model) is None:
            raise
        # the usual slip: the decomposed model (or another fxdeco result) passed where the original belongs; its
        # factored layers are what "no such layer" meant
        raise PlanMismatchError(f"{exc}; this {type(model).__name__} is itself a model fxdeco decomposed (its layers "
                                "are factored): load() re-applies the plan to a freshly built original model, so "
                                "pass the model as it was before fxdeco.transform") from None
    new = _chains(factorize_sites(gm, sites, factors), sites, reversed_order)
    new.delete_all_unused_submodules()
    _check_modules(new, plan)
    _check_weights(new, weights)
    # files saved since both digests exist compare the one that ignores the inputs' order
    by_name = isinstance(plan.get("graph_inputs_by_name"), str)
    saved = plan.get("graph_inputs_by_name") if by_name else plan.get("graph")
    if isinstance(saved, str) and saved != graph_signature(new, inputs_by_name=by_name):
        warn_user(f"fxdeco.load({str(folder)!r}): {type(model).__name__}'s graph, with the saved factors, is not the "
                  "graph that was saved: the model's code differs from the saved model's (other wiring or "
                  "operations around the same layers), so the loaded model computes something else than the saved "
                  "one; load into the model class and version the directory was saved from")
    new.load_state_dict(weights, strict=True)
    _restore_meta(new, plan)
    new.train(bool(plan.get("training", False)))
    log.info("loaded %d decomposed layers from %s", len(plan["sites"]), folder)
    return new
