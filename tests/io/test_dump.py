"""Graph dumps: DOT that parses back to exactly the graph, SVG via Graphviz, the before/after HTML page,
and the fallbacks without Graphviz."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import fxdeco
from fxdeco.io.dump import dump
from tests.models import Net

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_DOT = shutil.which("dot") is not None


@pytest.fixture(scope="module")
def decomposed() -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    return model, fxdeco.transform(model, data, keep_params=0.6, show_progress=False)


# ----------------------------------------------------------------------------- a small DOT reader for the tests


@dataclasses.dataclass
class Dot:
    nodes: list[tuple[str, dict[str, str]]]  # every node statement, in order (duplicates kept)
    edges: list[tuple[str, str]]
    clusters: dict[str, tuple[dict[str, str], list[str]]]  # name -> (graph attributes, nodes directly inside)


def _tokens(text: str) -> list[str]:
    """DOT tokens: quoted strings (unescaped, kept with a leading quote), words, ``->`` and punctuation."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c == '"':
            j, chars = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                    chars.append({"n": "\n", '"': '"', "\\": "\\"}.get(text[j], "\\" + text[j]))
                else:
                    chars.append(text[j])
                j += 1
            out.append('"' + "".join(chars))
            i = j + 1
        elif text.startswith("->", i):
            out.append("->")
            i += 2
        elif c in "{}[];,=":
            out.append(c)
            i += 1
        else:
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] in "_.#"):
                j += 1
            assert j > i, f"unexpected character {c!r} at {i}"
            out.append(text[i:j])
            i = j
    return out


def parse_dot(text: str) -> Dot:
    """Parse the DOT subset a writer needs (statements, attribute lists, nested subgraphs); fail on anything else."""
    toks = _tokens(text)
    pos = 0
    dot = Dot([], [], {})

    def take(expected: str | None = None) -> str:
        nonlocal pos
        tok = toks[pos]
        assert expected is None or tok == expected, f"expected {expected!r}, got {tok!r} at token {pos}"
        pos += 1
        return tok

    def ident() -> str:
        tok = take()
        assert tok not in "{}[];,=->", f"expected an identifier, got {tok!r}"
        return tok[1:] if tok.startswith('"') else tok

    def attrs() -> dict[str, str]:
        out: dict[str, str] = {}
        if toks[pos] != "[":
            return out
        take("[")
        while toks[pos] != "]":
            key = ident()
            take("=")
            out[key] = ident()
            if toks[pos] in ",;":
                take()
        take("]")
        return out

    def block(members: list[str]) -> None:
        take("{")
        while toks[pos] != "}":
            if toks[pos] in ("graph", "node", "edge"):
                kind = take()
                found = attrs()
                if kind == "graph" and dot.clusters and members is dot.clusters[next(reversed(dot.clusters))][1]:
                    dot.clusters[next(reversed(dot.clusters))][0].update(found)
            elif toks[pos] == "subgraph":
                take()
                name = ident()
                dot.clusters[name] = ({}, [])
                block(dot.clusters[name][1])
            else:
                first = ident()
                if toks[pos] == "->":
                    chain = [first]
                    while toks[pos] == "->":
                        take()
                        chain.append(ident())
                    attrs()
                    dot.edges += list(zip(chain, chain[1:]))
                elif toks[pos] == "=":
                    take()
                    ident()
                else:
                    dot.nodes.append((first, attrs()))
                    members.append(first)
            if toks[pos] == ";":
                take()
        take("}")

    take("digraph")
    if toks[pos] != "{":
        ident()
    block([])
    assert pos == len(toks), "text after the closing brace"
    return dot


def expected_view(gm: torch.fx.GraphModule) -> tuple[set[str], set[tuple[str, str]]]:
    """What a drawing of ``gm`` must hold, straight from the FX graph: every node but parameter reads, every edge."""
    nodes = {n.name for n in gm.graph.nodes if n.op != "get_attr"}
    edges = {(a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes if a.name in nodes and n.name in nodes}
    return nodes, edges


# ----------------------------------------------------------------------------- DOT


def test_dot_holds_every_node_and_edge_once(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    path = dump(gm, tmp_path / "g.dot")
    assert path == tmp_path / "g.dot"
    dot = parse_dot(path.read_text())
    names = [name for name, _ in dot.nodes]
    nodes, edges = expected_view(gm)
    assert sorted(names) == sorted(nodes), "each FX node (parameter reads aside) is declared exactly once"
    assert sorted(dot.edges) == sorted(edges), "each data dependency is drawn exactly once"


def test_dot_parses_with_pydot(decomposed, tmp_path: Path) -> None:
    pytest.importorskip("pydot")
    from networkx.drawing.nx_pydot import read_dot

    _, gm = decomposed
    graph = read_dot(dump(gm, tmp_path / "g.dot"))
    nodes, edges = expected_view(gm)
    assert set(graph.nodes) == nodes
    assert {(a, b) for a, b, _ in graph.edges} == edges


def test_decomposed_layers_are_boxed_with_rank_and_kept_share(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    dot = parse_dot(dump(gm, tmp_path / "g.dot").read_text())
    seconds = [n for n in gm.graph.nodes if "factored" in n.meta]
    assert seconds, "the fixture must decompose something"
    for second in seconds:
        info = second.meta["factored"]
        first = second.args[0]
        kept = f"{info.params_after / info.params_before:.0%}"
        box = [(attrs, nodes) for attrs, nodes in dot.clusters.values() if set(nodes) == {first.name, second.name}]
        assert len(box) == 1, f"{info.target}: its two factor layers share one box"
        label = box[0][0]["label"]
        assert info.target in label and f"rank {info.rank}/{info.full_rank}" in label and kept in label


def test_a_layer_called_twice_gets_two_boxes(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    data = [torch.randn(64, 4) @ torch.randn(4, 32) for _ in range(2)]
    gm = fxdeco.transform(Twice(), data, nsr_threshold=0.05, show_progress=False)
    pairs = [{n.args[0].name, n.name} for n in gm.graph.nodes if "factored" in n.meta]
    assert len(pairs) == 2
    dot = parse_dot(dump(gm, tmp_path / "g.dot").read_text())
    boxes = [set(nodes) for attrs, nodes in dot.clusters.values() if "fc decomposed" in attrs["label"]]
    assert sorted(map(sorted, boxes)) == sorted(map(sorted, pairs))


def test_an_input_used_everywhere_is_drawn_beside_each_user(tmp_path: Path) -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            for fc in self.fcs:
                x = fc(x) * mask
            return x

    gm = fxdeco.trace(Masked())
    users = [n.name for n in gm.graph.nodes if any(a.name == "mask" for a in n.all_input_nodes)]
    assert len(users) == 3
    dot = parse_dot(dump(gm, tmp_path / "g.dot").read_text())
    labels = dict(dot.nodes)
    assert "used by 3 nodes" in labels["mask"]["label"]
    assert not [e for e in dot.edges if e[0] == "mask"], "no edge runs from the one input node"
    copies = sorted((source, target) for source, target in dot.edges if source.startswith("mask."))
    assert [t for _, t in copies] == sorted(users) and all(labels[s]["label"] == "mask" for s, _ in copies)


def test_skipped_and_dense_layers_say_so(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    labels = {name: attrs for name, attrs in parse_dot(dump(gm, tmp_path / "g.dot").read_text()).nodes}
    skipped = gm.meta["fxdeco"].skipped
    assert len(skipped) == 2  # the two depthwise convolutions
    for k in skipped:
        assert k.reason in labels[k.node]["label"], "a skipped layer shows why"
    dense = [d.target for d in gm.meta["fxdeco"].decisions if not d.decomposed]
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in dense:
            assert "kept dense" in labels[n.name]["label"]


def test_blocks_become_clusters(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    dot = parse_dot(dump(gm, tmp_path / "g.dot").read_text())
    blocks = {name: attrs["label"] for name, (attrs, _) in dot.clusters.items() if "Block" in attrs.get("label", "")}
    assert sorted(blocks.values()) == ["blocks.0 · Block", "blocks.1 · Block"]
    # block 1's depthwise conv, its relu and the residual add are drawn inside block 1's box
    dw = next(n for n in gm.graph.nodes if n.target == "blocks.1.dw")
    relu = next(iter(dw.users))
    add = next(iter(relu.users))
    assert {dw.name, relu.name, add.name} <= set(dot.clusters["cluster_blocks.1"][1])


def test_before_and_after_in_one_dot(decomposed, tmp_path: Path) -> None:
    model, gm = decomposed
    dot = parse_dot(dump(gm, tmp_path / "g.dot", original=model).read_text())
    before, after = fxdeco.trace(model), gm
    names = [name for name, _ in dot.nodes]
    want = sorted([f"0:{n}" for n in expected_view(before)[0]] + [f"1:{n}" for n in expected_view(after)[0]])
    assert sorted(names) == want
    planned = {d.target: d for d in gm.meta["fxdeco"].decisions if d.decomposed}
    labels = dict(dot.nodes)
    for n in before.graph.nodes:
        if n.op == "call_module" and n.target in planned:
            assert f"rank {planned[n.target].rank}/{planned[n.target].full_rank}" in labels[f"0:{n.name}"]["label"]


# ----------------------------------------------------------------------------- SVG and HTML


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz dot is not installed")
def test_svg_is_drawn_by_graphviz(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    path = dump(gm, tmp_path / "g.svg")
    text = path.read_text()
    assert path.suffix == ".svg" and "<svg" in text and "</svg>" in text
    second = next(n for n in gm.graph.nodes if "factored" in n.meta)
    assert f"<title>{second.name}</title>" in text  # Graphviz titles each drawn node with its id


def test_missing_dot_writes_dot_and_says_so(decomposed, tmp_path: Path, monkeypatch, caplog) -> None:
    _, gm = decomposed
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="fxdeco.io.dump"):
        path = dump(gm, tmp_path / "g.svg")
    assert path == tmp_path / "g.dot" and not (tmp_path / "g.svg").exists()
    parse_dot(path.read_text())
    assert "Graphviz" in caplog.text and "apt-get install graphviz" in caplog.text and str(path) in caplog.text


def _panels(text: str) -> list[str]:
    parts = text.split('<section class="panel"')[1:]
    return [p.split("</section>")[0] for p in parts]


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz dot is not installed")
def test_html_shows_before_and_after_drawings(decomposed, tmp_path: Path) -> None:
    model, gm = decomposed
    text = dump(gm, tmp_path / "g.html", original=model).read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    before, after = _panels(text)
    assert "<svg" in before and "<svg" in after and "http://" not in text.split("<svg")[0]
    site = next(n for n in fxdeco.trace(model).graph.nodes if n.op == "call_module" and n.target == "fc1")
    factor = next(n for n in gm.graph.nodes if "factored" in n.meta)
    assert f"<title>{site.name}</title>" in before
    assert f"<title>{factor.name}</title>" in after and f"<title>{factor.name}</title>" not in before


def test_html_without_dot_lists_both_graphs(decomposed, tmp_path: Path, monkeypatch) -> None:
    model, gm = decomposed
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    text = dump(gm, tmp_path / "g.html", original=model).read_text()
    assert "<svg" not in text and "Graphviz <code>dot</code> was not found" in text
    before, after = _panels(text)
    for panel, graph in ((before, fxdeco.trace(model)), (after, gm)):
        for name in expected_view(graph)[0]:
            assert f"<code>{name}</code>" in panel


def test_html_of_a_plain_graph(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    text = dump(gm, tmp_path / "plain.html").read_text()
    assert len(_panels(text)) == 1


# ----------------------------------------------------------------------------- export graphs, bad input


def test_export_graph_is_drawn_with_blocks_and_layer_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    gm = fxdeco.transform(model, data, keep_params=0.6, capture="export", show_progress=False)
    dot = parse_dot(dump(gm, tmp_path / "x.dot", show_params=True).read_text())
    nodes, edges = expected_view(gm)
    params = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    assert params, "export graphs read parameters with get_attr"
    # the output does not use a guard node torch.export may add; everything else is drawn
    drawn = {name for name, _ in dot.nodes}
    assert nodes | params >= drawn >= {n for n in nodes | params if not n.startswith("_guards")}
    labels = dict(dot.nodes)
    dense = [d.target for d in gm.meta["fxdeco"].decisions if not d.decomposed]
    assert dense, "the fixture must keep some layer dense"
    for target in dense:  # the aten op of a dense layer is named after its layer and marked
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("nn_module_stack")
                    and list(n.meta["nn_module_stack"].values())[-1][0] == target)
        assert labels[node.name]["label"].splitlines() == [target.rpartition(".")[2], "conv2d" if "fc" not in target
                                                          else "linear", "kept dense"]
    assert any(attrs.get("label") == "blocks.1 · Block" for attrs, _ in dot.clusters.values())


def test_bad_format_and_directory_path(decomposed, tmp_path: Path) -> None:
    _, gm = decomposed
    with pytest.raises(ValueError, match="format must be one of dot, svg, html"):
        dump(gm, tmp_path / "g.png")
    with pytest.raises(IsADirectoryError, match="give a file name"):
        dump(gm, tmp_path, format="dot")


def test_lockd_dump_marks_dense_layers_dense(tmp_path) -> None:
    """lockd's finalize marks the layers it keeps dense in node.meta too; they were drawn as "rank None"."""
    from fxdeco import lockd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 2) @ torch.randn(2, 16) / 4)
    gm = lockd.prepare(model, nsr_threshold=0.1)
    lockd.train(gm, [torch.randn(64, 16) for _ in range(4)], steps=150)
    small = lockd.finalize(gm)
    rows = {r["name"]: r for r in fxdeco.report(small).rows}
    assert rows["0"]["rank"] is not None and rows["2"]["rank"] is None
    text = fxdeco.dump(small, tmp_path / "g.dot").read_text()
    assert "rank None" not in text and "kept dense" in text and "0 decomposed" in text
