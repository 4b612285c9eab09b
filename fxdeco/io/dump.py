"""``fxdeco.dump``: draw a (decomposed) graph as Graphviz DOT, SVG or a before/after HTML page.

The graph comes from :func:`passes.graph_view.to_networkx`; the DOT text is
written here, so DOT output never needs Graphviz. SVG needs the Graphviz ``dot``
program (Debian package ``graphviz``); without it :func:`dump` logs how to get
it and writes the DOT file instead. The HTML page is self-contained: inline
SVGs when ``dot`` is installed, otherwise a grouped node listing and the DOT
text.

What the drawing shows:

* decomposed layers: the two factor layers in a green box titled
  ``<layer>: rank r/full, keeps p% of params``;
* layers a method kept dense (grey, with the reason in the tooltip) and layers
  that could not be decomposed (orange, with the reason in the label);
* one box per block of the model (``layer1.0``, ``blocks.3``), nested two deep,
  so graphs of hundreds of nodes stay readable; parameter reads (``get_attr``)
  are left out unless ``show_params=True``.

Example:
    >>> import tempfile, pathlib, torch, fxdeco
    >>> from fxdeco.io.dump import dump
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = fxdeco.transform(model, [torch.randn(64, 4) @ torch.randn(4, 32)], nsr_threshold=0.01)
    >>> out = dump(small, pathlib.Path(tempfile.mkdtemp()) / "graph.dot")
    >>> "rank 4/32" in out.read_text()
    True
"""

from __future__ import annotations

import dataclasses
import html
import logging
import pathlib
import shutil
import subprocess
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx
from torch import nn

from fxdeco.capture import trace
from fxdeco.metadata import ModelRecord, factored_layers, find_model_record, is_first_factor
from fxdeco.io.report import human
from passes import find_sites
from passes.graph_view import to_networkx

log = logging.getLogger(__name__)

FORMATS = ("dot", "svg", "html")
# Fill colours by role; the HTML legend and the fallback listing use the same ones.
COLOURS = {"factor": "#b7e4b7", "planned": "#b7e4b7", "dense": "#e4e4e4", "skipped": "#ffd199",
           "io": "#cfe2ff", "copy": "#cfe2ff", "op": "#ffffff"}
DECOMPOSED_BOX = "#eaf7ea"
DOT_TIMEOUT_S = 600


@dataclasses.dataclass
class Panel:
    """One graph to draw: its networkx view, a title and the boxes (clusters) to draw around nodes."""

    title: str
    graph: nx.DiGraph
    boxes: dict[str, dict[str, str]]  # scope -> DOT attributes of its cluster


# ----------------------------------------------------------------------------------------------- annotation


def _fraction(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _describe_module(module: nn.Module) -> str:
    """``Conv2d 128→148 3x3/2`` or ``Linear 384→96``: the layer's size at a glance."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{name} {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = "x".join(map(str, module.kernel_size))
        strides = set(module.stride)
        stride = "" if strides == {1} else f"/{module.stride[0]}" if len(strides) == 1 else "/" + "x".join(
            map(str, module.stride))
        groups = f" g{module.groups}" if module.groups != 1 else ""
        return f"{name} {module.in_channels}→{module.out_channels} {kernel}{stride}{groups}"
    return name


def _short_target(target: str) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``torch.flatten`` -> ``flatten``."""
    parts = target.split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    return parts[-1]


def _shape_text(shape: Any) -> str:
    # The leading (batch) dimension is dropped: it is the calibration batch size, not the model's.
    return "×".join(map(str, shape[1:])) if shape and len(shape) > 1 else ""


def _base_labels(gm: torch.fx.GraphModule, graph: nx.DiGraph) -> None:
    """Give every node a short label, its fill role and a tooltip."""
    for name, attrs in graph.nodes(data=True):
        op, target, scope = attrs["op"], attrs["target"], attrs["scope"]
        if op == "call_module":
            inner = scope[-1] + "." if scope else ""
            what = target[len(inner):] if target.startswith(inner) else target
            detail = _describe_module(gm.get_submodule(target))
        elif op in ("placeholder", "output"):
            what, detail = ("input " + target if op == "placeholder" else "output"), ""
        elif op == "get_attr":
            what, detail = "param " + target.rpartition(".")[2], target
        else:
            what, detail = _short_target(target), ""
            module = attrs.get("module")
            if module and module not in scope:  # an op of a layer (export graphs): name the layer too
                inner = scope[-1] + "." if scope else ""
                what, detail = (module[len(inner):] if module.startswith(inner) else module), what
        attrs["label"] = f"{what}\n{detail}" if detail else what
        attrs["role"] = "io" if op in ("placeholder", "output") else "op"
        # Shapes go in the tooltip only: one more line per node makes long graphs much taller.
        shape = f" -> {_shape_text(attrs['shape'])} per sample" if attrs["shape"] and len(attrs["shape"]) > 1 else ""
        attrs["tooltip"] = f"{name}: {op} {target}{shape}"


def _site_nodes(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """Layer name -> the graph nodes computing it (several when a layer is called twice)."""
    nodes: dict[str, list[str]] = {}
    for site in find_sites(gm)[0]:
        nodes.setdefault(site.target, []).append(site.node)
    return nodes


def _mark(graph: nx.DiGraph, node: str, role: str, note: str) -> None:
    if node in graph:
        attrs = graph.nodes[node]
        attrs["role"] = role
        attrs["label"] += "\n" + note
        attrs["tooltip"] += "\n" + note


def _annotate_skipped(graph: nx.DiGraph, info: ModelRecord) -> None:
    for skipped in info.skipped:
        _mark(graph, skipped.node, "skipped", f"not decomposed: {skipped.reason}")


def _annotate_after(gm: torch.fx.GraphModule, graph: nx.DiGraph, boxes: dict[str, dict[str, str]]) -> None:
    """Box each pair of factor layers and label it with rank and kept proportion; mark dense and skipped layers."""
    info = find_model_record(gm)
    if info is None:
        return
    # a layer called twice has two pairs; lockd also marks the layers it keeps dense (rank None): not boxes
    for node, record in factored_layers(gm):
        layer, nsr = record.target, record.method_meta.get("nsr")
        nsr = f", nsr {nsr:.3g}" if isinstance(nsr, float) else ""
        title = (f"{layer} decomposed\nrank {record.rank}/{record.full_rank}, keeps "
                 f"{_fraction(record.params_after, record.params_before)} of params{nsr}")
        # The first factor feeds the second; both go in one box inside the layer's block.
        members = [node.name] + [n.name for n in node.all_input_nodes if is_first_factor(n)]
        box = graph.nodes[node.name]["scope"] + (f"{layer}@{node.name}",)
        boxes[box[-1]] = {"label": title, "style": "filled,rounded", "fillcolor": DECOMPOSED_BOX,
                          "color": "#2e8b57", "penwidth": "2"}
        for member in members:
            attrs = graph.nodes[member]
            attrs["scope"], attrs["role"] = box, "factor"
            attrs["tooltip"] += "\n" + title.replace("\n", ": ")
    dense = [d for d in info.decisions if not d.decomposed]
    if dense:
        nodes = _site_nodes(gm)
        for d in dense:
            for node in nodes.get(d.target, []):
                _mark(graph, node, "dense", "kept dense")
                graph.nodes[node]["tooltip"] += f": {d.reason}"
    _annotate_skipped(graph, info)


def _annotate_before(original: torch.fx.GraphModule, graph: nx.DiGraph, info: ModelRecord | None) -> None:
    """On the original graph, say what became of each layer."""
    if info is None:
        return
    nodes = _site_nodes(original)
    for d in info.decisions:
        for node in nodes.get(d.target, []):
            if d.decomposed:
                _mark(graph, node, "planned", f"→ rank {d.rank}/{d.full_rank}, "
                                              f"{_fraction(d.params_after, d.params_before)} of params")
            else:
                _mark(graph, node, "dense", "kept dense")
                graph.nodes[node]["tooltip"] += f": {d.reason}"
    _annotate_skipped(graph, info)


def _hide_params(graph: nx.DiGraph) -> int:
    hidden = [n for n, a in graph.nodes(data=True) if a["op"] == "get_attr"]
    graph.remove_nodes_from(hidden)
    return len(hidden)


def _split_shared_values(graph: nx.DiGraph, max_input_users: int = 2, max_users: int = 4) -> None:
    """Draw a value used all over (an attention mask, a sequence length) as a small copy beside each user.

    Edges from one node to every block would cross the whole drawing. The node
    itself stays where it is, with its inputs; model inputs are split from 3
    users on, other values from 5 (a transformer layer's input feeds 4 nodes).
    """
    for name, attrs in list(graph.nodes(data=True)):
        limit = max_input_users if attrs["op"] == "placeholder" else max_users
        users = sorted(graph.successors(name), key=lambda u: graph.nodes[u]["index"])
        if len(users) <= limit:
            continue
        short = attrs["target"] if attrs["op"] == "placeholder" else attrs["label"].splitlines()[0]
        for i, user in enumerate(users):
            copy = f"{name}.use{i}"
            graph.add_node(copy, **{**attrs, "op": "copy", "role": "copy", "label": short,
                                    "scope": graph.nodes[user]["scope"], "index": graph.nodes[user]["index"] - 0.5,
                                    "tooltip": f"{name} (drawn beside each of its {len(users)} users)"})
            graph.remove_edge(name, user)
            graph.add_edge(copy, user)
        attrs["label"] += f"\n(used by {len(users)} nodes)"


def _hide_dead_ends(graph: nx.DiGraph) -> int:
    """Remove nodes the output does not depend on (shape assertions); return how many."""
    outputs = [n for n, a in graph.nodes(data=True) if a["op"] == "output"]
    needed = set(outputs).union(*(nx.ancestors(graph, o) for o in outputs))
    hidden = [n for n in graph.nodes if n not in needed]
    graph.remove_nodes_from(hidden)
    return len(hidden)


def _block_boxes(graph: nx.DiGraph) -> dict[str, dict[str, str]]:
    kinds = graph.graph.get("scopes", {})
    return {scope: {"label": f"{scope} · {kind}" if kind else scope, "style": "rounded", "color": "#9aa5b1"}
            for scope, kind in kinds.items()}


def panel(gm: torch.fx.GraphModule, title: str, *, show_params: bool = False, max_depth: int = 2,
          before_of: torch.fx.GraphModule | None = None) -> Panel:
    """The annotated view of ``gm``; with ``before_of``, ``gm`` is the original of that decomposed graph.

    Example:
        >>> import torch
        >>> p = panel(torch.fx.symbolic_trace(torch.nn.Linear(3, 2)), "plain")
        >>> sorted(p.graph.nodes)  # parameter reads are hidden
        ['input_1', 'linear', 'output']
    """
    graph = to_networkx(gm, max_depth=max_depth)
    _base_labels(gm, graph)
    boxes = _block_boxes(graph)
    if before_of is None:
        _annotate_after(gm, graph, boxes)
    else:
        _annotate_before(gm, graph, find_model_record(before_of))
    notes = []
    if not show_params and (params := _hide_params(graph)):
        notes.append(f"{params} parameter reads")
    if dead := _hide_dead_ends(graph):
        notes.append(f"{dead} node{'s' if dead > 1 else ''} the output does not use (checks, assertions)")
    if notes:
        title += f" ({' and '.join(notes)} not shown)"
    _split_shared_values(graph)
    return Panel(title, graph, boxes)


def summary(gm: torch.fx.GraphModule) -> str:
    """One line on what a decomposition did (empty for a graph fxdeco did not produce).

    Example:
        >>> import torch
        >>> summary(torch.fx.symbolic_trace(torch.nn.Linear(3, 2)))
        ''
    """
    info = find_model_record(gm)
    if info is None:
        return ""
    decisions = info.decisions
    text = (f"{info.method}: {sum(d.decomposed for d in decisions)} of {len(decisions)} layers decomposed, "
            f"params {human(info.params_before)} → {human(info.params_after)} "
            f"({_fraction(info.params_after, info.params_before)})")
    if info.macs_before:
        text += (f", MACs/sample {human(info.macs_before)} → {human(info.macs_after)} "
                 f"({_fraction(info.macs_after, info.macs_before)})")
    if info.skipped:
        text += f", {len(info.skipped)} layers not decomposable"
    return text


# ----------------------------------------------------------------------------------------------- DOT


def quote(text: str) -> str:
    """A DOT double-quoted string; newlines become DOT's centred line breaks.

    Example:
        >>> print(quote('a "b"\\nc'))
        "a \\"b\\"\\nc"
    """
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attr_list(attrs: dict[str, str]) -> str:
    return ", ".join(f"{key}={quote(str(value))}" for key, value in attrs.items())


def _node_attrs(attrs: dict[str, Any]) -> dict[str, str]:
    role = attrs["role"]
    out = {"label": attrs["label"], "tooltip": attrs["tooltip"], "fillcolor": COLOURS[role]}
    if role in ("factor", "planned"):
        out.update(color="#2e8b57", penwidth="2")
    elif role == "skipped":
        out.update(color="#c46a00")
    elif role == "io":
        out.update(shape="oval")
    elif role == "copy":
        out.update(shape="oval", fontsize="8", height="0.2", color="#9aa5b1")
    return out


def _scope_tree(graph: nx.DiGraph) -> dict[tuple[str, ...], list[str]]:
    """Scope chain -> the nodes directly in it (graph order)."""
    members: dict[tuple[str, ...], list[str]] = {}
    for name, attrs in sorted(graph.nodes(data=True), key=lambda item: item[1]["index"]):
        members.setdefault(tuple(attrs["scope"]), []).append(name)
    return members


def _write_scope(lines: list[str], chain: tuple[str, ...], members: dict[tuple[str, ...], list[str]],
                 pnl: Panel, prefix: str, indent: str) -> None:
    """Emit the nodes of ``chain`` and, recursively, its sub-boxes (in order of first appearance)."""
    for name in members.get(chain, []):
        lines.append(f"{indent}{quote(prefix + name)} [{_attr_list(_node_attrs(pnl.graph.nodes[name]))}];")
    children: list[str] = []
    for other in members:
        if len(other) > len(chain) and other[: len(chain)] == chain and other[len(chain)] not in children:
            children.append(other[len(chain)])
    for child in children:
        box = pnl.boxes.get(child, {"label": child, "style": "rounded"})
        lines.append(f"{indent}subgraph {quote('cluster_' + prefix + child)} {{")
        lines.append(f"{indent}  graph [{_attr_list(box)}];")
        _write_scope(lines, chain + (child,), members, pnl, prefix, indent + "  ")
        lines.append(f"{indent}}}")


def to_dot(panels: Iterable[Panel], title: str = "") -> str:
    """DOT text for one or more panels; several panels are drawn side by side, node ids prefixed ``<i>:``.

    Example:
        >>> import torch
        >>> text = to_dot([panel(torch.fx.symbolic_trace(torch.nn.Linear(3, 2)), "g")])
        >>> text.splitlines()[0], '"input_1" -> "linear";' in text
        ('digraph "fxdeco" {', True)
    """
    panels = list(panels)
    # No newrank=true: with clusters it made layouts of two ViT graphs take minutes instead of a second.
    graph_attrs = dict(rankdir="TB", fontname="Helvetica", fontsize="12", labelloc="t", label=title,
                       nodesep="0.2", ranksep="0.25")
    node_attrs = dict(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10", height="0.3",
                      margin="0.08,0.03")
    lines = ['digraph "fxdeco" {', f"  graph [{_attr_list(graph_attrs)}];", f"  node [{_attr_list(node_attrs)}];",
             f"  edge [{_attr_list(dict(arrowsize='0.6', color='#7b8794'))}];"]
    for i, pnl in enumerate(panels):
        prefix = f"{i}:" if len(panels) > 1 else ""
        members = _scope_tree(pnl.graph)
        if len(panels) > 1:
            lines.append(f"  subgraph {quote(f'cluster_panel{i}')} {{")
            lines.append(f"    graph [{_attr_list(dict(label=pnl.title, style='dashed', fontsize='14'))}];")
            _write_scope(lines, (), members, pnl, prefix, "    ")
            lines.append("  }")
        else:
            _write_scope(lines, (), members, pnl, prefix, "  ")
        for source, target in pnl.graph.edges:
            lines.append(f"  {quote(prefix + source)} -> {quote(prefix + target)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- SVG / HTML


def dot_program() -> str | None:
    """The Graphviz ``dot`` executable, or None when Graphviz is not installed."""
    return shutil.which("dot")


def render_svg(dot_text: str, program: str) -> str:
    """Lay out ``dot_text`` with Graphviz and return the SVG text."""
    done = subprocess.run([program, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=DOT_TIMEOUT_S)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"Graphviz dot failed (exit {done.returncode}): {first}")
    return done.stdout


def _inline_svg(svg: str) -> str:
    """Drop the XML prolog and DOCTYPE so the SVG can sit inside HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def _listing(pnl: Panel) -> str:
    """The no-Graphviz view: nodes grouped by block in graph order, each with its inputs."""
    parts: list[str] = []
    current: tuple[str, ...] | None = None
    for name, attrs in sorted(pnl.graph.nodes(data=True), key=lambda item: item[1]["index"]):
        scope = tuple(attrs["scope"])
        if scope != current:
            if current is not None:
                parts.append("</ul>")
            heading = " / ".join(pnl.boxes.get(s, {}).get("label", s) for s in scope) or "(model)"
            parts.append(f"<h4>{html.escape(heading)}</h4><ul>")
            current = scope
        inputs = ", ".join(html.escape(p) for p in sorted(pnl.graph.predecessors(name),
                                                              key=lambda p: pnl.graph.nodes[p]["index"]))
        label = html.escape(attrs["label"]).replace("\n", " · ")
        source = f' <span class="in">← {inputs}</span>' if inputs else ""
        parts.append(f'<li class="{attrs["role"]}" title="{html.escape(attrs["tooltip"])}"><code>'
                     f'{html.escape(name)}</code> {label}{source}</li>')
    if current is not None:
        parts.append("</ul>")
    return "\n".join(parts)


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:16px;color:#1f2933}
h1{font-size:20px;margin:0 0 4px} .sum{margin:0 0 8px}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #9aa5b1;border-radius:4px;
font-size:13px}
.panels{display:flex;gap:12px;align-items:flex-start}
.panel{flex:1 1 0;min-width:0;border:1px solid #cbd2d9;border-radius:6px;padding:8px}
.panel h2{font-size:16px;margin:0 0 6px}
.view{overflow:auto;max-height:85vh}
.fit svg{max-width:100%;height:auto}
ul{list-style:none;padding-left:8px;margin:2px 0} li{padding:1px 4px;margin:1px 0;font-size:13px;border-radius:3px}
.in{color:#7b8794} h4{margin:8px 0 2px;font-size:13px;color:#52606d}
details{margin-top:12px} pre{font-size:11px;overflow:auto;max-height:40vh;background:#f5f7fa;padding:8px}
table{border-collapse:collapse;font-size:12px} td,th{padding:2px 8px;border-bottom:1px solid #e4e7eb;text-align:left}
button{margin-bottom:6px}
"""
_SCRIPT = """
function fit(b){var v=b.parentNode.querySelector('.view');v.classList.toggle('fit');
b.textContent=v.classList.contains('fit')?'actual size':'fit width';}
// Scroll the panels together (proportionally), so 'before' and 'after' show the same part of the model.
var syncing=false;
function sync(e){if(syncing)return;syncing=true;var s=e.target;
document.querySelectorAll('.view').forEach(function(v){if(v!==s){
var fy=s.scrollTop/Math.max(1,s.scrollHeight-s.clientHeight),fx=s.scrollLeft/Math.max(1,s.scrollWidth-s.clientWidth);
v.scrollTop=fy*(v.scrollHeight-v.clientHeight);v.scrollLeft=fx*(v.scrollWidth-v.clientWidth);}});
requestAnimationFrame(function(){syncing=false;});}
window.addEventListener('load',function(){document.querySelectorAll('.view').forEach(function(v){
v.scrollLeft=(v.scrollWidth-v.clientWidth)/2;v.addEventListener('scroll',sync);});});
"""


def _legend() -> str:
    names = {"factor": "decomposed (factor layers)", "dense": "kept dense", "skipped": "not decomposable",
             "io": "input / output"}
    return "".join(f'<span style="background:{COLOURS[role]}">{text}</span>' for role, text in names.items())


def _report_table(gm: torch.fx.GraphModule) -> str:
    if find_model_record(gm) is None:
        return ""
    from fxdeco.io.report import report  # the table is optional decoration; keep the import local
    return f"<details><summary>per-layer report</summary>{report(gm).table('html')}</details>"


def to_html(panels: list[Panel], gm: torch.fx.GraphModule, dot_text: str, svgs: list[str] | None) -> str:
    """A self-contained page: the panels side by side (inline SVG, or listings when ``svgs`` is None)."""
    views = []
    for i, pnl in enumerate(panels):
        body = (f'<button onclick="fit(this)">fit width</button><div class="view">{_inline_svg(svgs[i])}</div>'
                if svgs is not None else f'<div class="view">{_listing(pnl)}</div>')
        views.append(f'<section class="panel" id="panel{i}"><h2>{html.escape(pnl.title)}</h2>{body}</section>')
    note = "" if svgs is not None else (
        "<p><b>Graphviz <code>dot</code> was not found</b>, so the graphs are listed as text below; install "
        "Graphviz (Debian: <code>apt-get install graphviz</code>) and dump again for drawings.</p>")
    roles = "".join(f"li.{role}{{background:{colour}}}" for role, colour in COLOURS.items() if role != "op")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fxdeco graph</title>"
            f"<style>{_CSS}{roles}</style>"
            f"<script>{_SCRIPT}</script></head><body><h1>fxdeco graph</h1>"
            f"<p class='sum'>{html.escape(summary(gm))}</p><p class='legend'>{_legend()}</p>{note}"
            f"<div class='panels'>{''.join(views)}</div>{_report_table(gm)}"
            f"<details><summary>DOT source</summary><pre>{html.escape(dot_text)}</pre></details></body></html>\n")


# ----------------------------------------------------------------------------------------------- entry point


def _as_graph(model: nn.Module, example_inputs: Any, capture: str) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"dump() draws a GraphModule or an nn.Module, got {type(model).__name__}")
    return trace(model, example_inputs, capture=capture)


def dump(
    gm: torch.fx.GraphModule | nn.Module,
    path: str | pathlib.Path,
    format: str | None = None,
    original: torch.fx.GraphModule | nn.Module | None = None,
    *,
    example_inputs: Any = None,
    show_params: bool = False,
    max_depth: int = 2,
) -> pathlib.Path:
    """Draw ``gm`` to ``path`` as ``"dot"``, ``"svg"`` or ``"html"``; return the path written.

    ``format`` defaults to the suffix of ``path`` (``.svg``, ``.html``), else DOT.
    ``original``, the model before decomposition (a GraphModule, or an
    ``nn.Module`` that is captured the way ``gm`` was; ``example_inputs`` for a
    model that needs ``torch.export``), is drawn beside ``gm``: in the HTML page
    as a second panel, in DOT/SVG as a second box in the same drawing.
    Without Graphviz, ``"svg"`` writes ``path`` with a ``.dot`` suffix and logs
    why. ``max_depth`` is how many nested block boxes to draw; ``show_params``
    draws the parameter reads of export graphs.

    Example:
        >>> import tempfile, pathlib, torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> dump(gm, pathlib.Path(tempfile.mkdtemp()) / "g.html").suffix
        '.html'
    """
    path = pathlib.Path(path)
    fmt = format if format is not None else (path.suffix.lstrip(".").lower() if path.suffix else "dot")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as {path / ('graph.' + fmt)}")
    gm = _as_graph(gm, example_inputs, "auto")
    record = find_model_record(gm)
    capture = record.capture if record is not None else "auto"
    panels = []
    if original is not None:
        before = _as_graph(original, example_inputs, capture if capture in ("symbolic", "export") else "auto")
        panels.append(panel(before, "before", show_params=show_params, max_depth=max_depth, before_of=gm))
    panels.append(panel(gm, "after" if original is not None else "graph", show_params=show_params,
                        max_depth=max_depth))
    title = summary(gm)
    program = dot_program()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        svgs = [render_svg(to_dot([p]), program) for p in panels] if program else None
        if program is None:
            log.warning("Graphviz 'dot' not found on PATH: the HTML page lists the graph as text instead of drawing "
                        "it; install Graphviz (Debian: apt-get install graphviz) for drawings")
        path.write_text(to_html(panels, gm, to_dot(panels, title), svgs), encoding="utf-8")
        return path
    dot_text = to_dot(panels, title)
    if fmt == "svg" and program is None:
        fallback = path.with_suffix(".dot")
        log.warning("Graphviz 'dot' not found on PATH, so no SVG was drawn; wrote the DOT text to %s instead. "
                    "Install Graphviz (Debian: apt-get install graphviz) and run: dot -Tsvg %s -o %s",
                    fallback, fallback, path)
        path = fallback
    elif fmt == "svg":
        path.write_text(render_svg(dot_text, program), encoding="utf-8")
        return path
    path.write_text(dot_text, encoding="utf-8")
    return path
