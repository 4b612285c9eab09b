"""Property tests of the capture -> calibrate -> plan -> rewrite pipeline.

Hypothesis draws one- and two-layer Linear / Conv2d models (channels, kernel
sizes incl. non-square, stride, padding incl. 'same'/'valid', dilation, bias,
float32/float64) and checks what must hold for every shape:

* the factors have the documented shapes: first ``(r, in[, kh, kw])``,
  second ``(out, r)``;
* parameter accounting (``node.meta["factored"]``, ``LayerDecision``,
  ``fxdeco.report`` totals) matches the parameters the modules really hold;
* MAC accounting (``LayerDecision.macs_*`` and report totals) matches what
  ``passes.CostProp`` measures on the dense and the factored graphs, per sample;
* a full-rank factorization reproduces the original outputs, and the dtype of
  parameters and outputs is preserved.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxdeco
from fxdeco.methods.falor.local import falor_local
from fxdeco.methods.falor.lowrank import projection_factors, spectrum
from fxdeco.plan import decision
from passes import CostProp, Factorization, export_capture, factorize_sites
from passes.sites import fetch_attr

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- model strategies


@dataclasses.dataclass(frozen=True)
class Spec:
    """A drawn model: its layers, input shape (without batch) and dtype."""

    kind: str  # "linear" | "conv2d"
    layers: tuple[dict[str, Any], ...]  # constructor kwargs of each layer
    sample_shape: tuple[int, ...]  # one sample's input shape
    dtype: torch.dtype
    seed: int

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        mods: list[nn.Module] = []
        for i, kw in enumerate(self.layers):
            if i:
                mods.append(nn.ReLU())
            mods.append(nn.Linear(**kw) if self.kind == "linear" else nn.Conv2d(**kw))
        return nn.Sequential(*mods).to(self.dtype)

    def batch(self, n: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
        """``n`` random samples; with ``rank``, Linear inputs lie in a ``rank``-dim subspace."""
        x = torch.randn(n, *self.sample_shape, generator=generator, dtype=torch.float64)
        if rank is not None and self.kind == "linear":
            dim = self.sample_shape[-1]
            g = torch.Generator().manual_seed(self.seed + 1)  # the same subspace for every batch
            basis = torch.randn(min(rank, dim), dim, generator=g, dtype=torch.float64)
            x = torch.randn(*x.shape[:-1], basis.shape[0], generator=generator, dtype=torch.float64) @ basis
        return x.to(self.dtype)


@st.composite
def linear_specs(draw: st.DrawFn) -> Spec:
    dims = [draw(st.integers(1, 24)) for _ in range(draw(st.integers(1, 2)) + 1)]
    layers = tuple(dict(in_features=a, out_features=b, bias=draw(st.booleans())) for a, b in zip(dims, dims[1:]))
    lead = tuple(draw(st.lists(st.integers(1, 5), max_size=1)))  # optional sequence dimension
    return Spec("linear", layers, (*lead, dims[0]), draw(st.sampled_from([torch.float32, torch.float64])),
                draw(st.integers(0, 2**16)))


@st.composite
def conv_specs(draw: st.DrawFn, string_padding: bool = True) -> Spec:
    n_layers = draw(st.integers(1, 2))
    channels = [draw(st.integers(1, 6)) for _ in range(n_layers + 1)]
    size = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]  # input height, width before the kernels' span
    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        # stride 1 half of the time: padding='same' needs it
        stride = draw(st.just((1, 1)) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        choices = ["int", "tuple"] + (["valid"] if string_padding else [])
        choices += ["same"] if string_padding and stride == (1, 1) else []  # torch allows 'same' only with stride 1
        how = draw(st.sampled_from(choices))
        if how == "int":
            padding: Any = draw(st.integers(0, 2))
        elif how == "tuple":
            padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        else:
            padding = how
        layers.append(dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride,
                           padding=padding, dilation=dilation, bias=draw(st.booleans())))
    # Grow the input until every layer has at least one output pixel.
    shape = list(size)
    while True:
        h, w = shape
        ok = True
        for kw in layers:
            pad = kw["padding"]
            pad = (pad, pad) if isinstance(pad, int) else (0, 0) if pad in ("valid", "same") else pad
            span = [d * (k - 1) + 1 for d, k in zip(kw["dilation"], kw["kernel_size"])]
            if kw["padding"] == "same":
                continue
            h = (h + 2 * pad[0] - span[0]) // kw["stride"][0] + 1
            w = (w + 2 * pad[1] - span[1]) // kw["stride"][1] + 1
            if h < 1 or w < 1:
                ok = False
                break
        if ok:
            break
        shape = [shape[0] + 1, shape[1] + 1]
    return Spec("conv2d", tuple(layers), (channels[0], *shape),
                draw(st.sampled_from([torch.float32, torch.float64])), draw(st.integers(0, 2**16)))


# sampled_from + flatmap draws both kinds about equally often (one_of favours its simpler branch).
specs = st.sampled_from(["linear", "conv2d"]).flatmap(lambda k: linear_specs() if k == "linear" else conv_specs())


# ----------------------------------------------------------------------------- helpers


def calibrated(spec: Spec, gm_or_model: nn.Module, batch_sizes: list[int], rank: int | None = None
               ) -> tuple[fxdeco.PreparedModel, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(spec.seed)
    batches = [spec.batch(n, g, rank) for n in batch_sizes]
    prepared = fxdeco.prepare(gm_or_model)
    fxdeco.calibrate(prepared, batches)
    return prepared, batches


def node_macs(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, int]:
    """MACs of every node of ``gm`` for the call ``gm(x)``, measured by CostProp."""
    CostProp(gm).run(x)
    return {n.name: n.meta["cost"].macs for n in gm.graph.nodes}


def factored_nodes(gm: torch.fx.GraphModule) -> dict[str, tuple[torch.fx.Node, torch.fx.Node]]:
    """``{layer target: (first-factor node, second-factor node)}`` of a rewritten graph."""
    found = {}
    for n in gm.graph.nodes:
        if "factored" in n.meta:
            first = n.args[0]
            assert first.meta.get("factor_role") == "first"
            found[n.meta["factored"].target] = (first, n)
    return found


def tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-4


def first_shape(site: Any, rank: int) -> tuple[int, ...]:
    return (rank, *site.weight_shape[1:])


# ----------------------------------------------------------------------------- properties


def _check_direct(spec: Spec, data: st.DataObject) -> bool:
    """Factor at drawn ranks: shapes, params, MACs, dtype, exactness at full rank; return whether all were full."""
    model = spec.build()
    prepared, batches = calibrated(spec, model, [3, 2])
    gm, sites = prepared.gm, prepared.sites
    assert len(sites) == len(spec.layers)
    plan, ranks, decisions = {}, {}, {}
    for site in sites:
        rank = data.draw(st.integers(1, site.full_rank) | st.just(site.full_rank), label=f"rank {site.target}")
        stats = prepared.statistics[site.target]
        first, second = projection_factors(site, fetch_attr(gm, site.weight), spectrum(stats), rank)
        assert tuple(first.shape) == first_shape(site, rank)
        assert tuple(second.shape) == (site.out_features, rank)
        plan[site.target] = Factorization(first, second)
        ranks[site.target] = rank
        decisions[site.target] = decision(site, stats, rank, None, "drawn")

    new = factorize_sites(gm, sites, plan)
    found = factored_nodes(new)
    assert set(found) == set(plan)

    x = spec.batch(5, torch.Generator().manual_seed(spec.seed + 7))
    dense_macs, new_macs = node_macs(gm, x), node_macs(new, x)
    for site in sites:
        rank, d = ranks[site.target], decisions[site.target]
        a_mod, b_mod = new.get_submodule(f"{site.target}.0"), new.get_submodule(f"{site.target}.1")
        dense = model.get_submodule(site.target)
        # Shapes of the installed factors.
        assert tuple(a_mod.weight.shape) == first_shape(site, rank)
        assert tuple(b_mod.weight.shape)[:2] == (site.out_features, rank)
        # Parameter accounting: meta and decision count weights and bias; the bias moves to the second factor.
        meta = found[site.target][1].meta["factored"]
        assert meta.rank == rank and meta.full_rank == site.full_rank
        assert meta.params_before == d.params_before == sum(p.numel() for p in dense.parameters())
        assert meta.params_after == d.params_after == \
            sum(p.numel() for p in a_mod.parameters()) + sum(p.numel() for p in b_mod.parameters())
        assert a_mod.bias is None
        if dense.bias is None:
            assert b_mod.bias is None
        else:
            assert torch.equal(b_mod.bias, dense.bias)
        # MAC accounting: the decision's per-sample MACs are CostProp's, divided by the batch size.
        site_node = site.node
        assert dense_macs[site_node] / x.shape[0] == pytest.approx(d.macs_before, rel=1e-12)
        first_node, second_node = found[site.target]
        assert (new_macs[first_node.name] + new_macs[second_node.name]) / x.shape[0] == \
            pytest.approx(d.macs_after, rel=1e-12)
        # dtype preserved.
        assert a_mod.weight.dtype == b_mod.weight.dtype == spec.dtype

    assert sum(new_macs.values()) == pytest.approx(sum(dense_macs.values()) - sum(
        (d.macs_before - d.macs_after) * x.shape[0] for d in decisions.values()), rel=1e-12)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in model.parameters()) - sum(
        d.params_before - d.params_after for d in decisions.values())

    with torch.no_grad():
        out_new, out_dense = new(x), gm(x)
    assert out_new.dtype == out_dense.dtype == spec.dtype and out_new.shape == out_dense.shape
    if all(ranks[s.target] == s.full_rank for s in sites):
        # The full-rank projection is exact on every output the statistics have seen
        # (the calibration batches), whatever the shapes.
        for b in batches:
            with torch.no_grad():
                want, got = gm(b), new(b)
            scale = want.abs().max().item() + 1.0
            torch.testing.assert_close(got, want, rtol=0, atol=tolerance(spec.dtype) * scale)
    return all(ranks[s.target] == s.full_rank for s in sites)


def test_direct_plan_shapes_accounting_and_full_rank() -> None:
    """Factor every layer at a drawn rank (often the full rank) and check the properties of ``_check_direct``."""
    outcomes: list[tuple[str, bool]] = []
    paddings: set[str] = set()

    @settings(max_examples=60, **SETTINGS)
    @given(spec=specs, data=st.data())
    def prop(spec: Spec, data: st.DataObject) -> None:
        outcomes.append((spec.kind, _check_direct(spec, data)))
        paddings.update(str(kw.get("padding")) for kw in spec.layers)

    prop()
    # The exactness branch must have run for both layer kinds, and low ranks must have been drawn too.
    assert {("linear", True), ("conv2d", True)} <= set(outcomes), outcomes
    assert any(not full for _, full in outcomes), outcomes
    assert {"same", "valid"} <= paddings, paddings


def test_full_rank_projection_is_exact_on_new_inputs_when_out_le_in() -> None:
    """With ``out <= in`` the full-rank basis is orthogonal, so the factorization is exact for ANY input."""

    checked: list[int] = []

    @settings(max_examples=25, **SETTINGS)
    @given(spec=specs)
    def check(spec: Spec) -> None:
        model = spec.build()
        prepared, _ = calibrated(spec, model, [2])
        plan = {}
        for site in prepared.sites:
            if site.out_features > site.in_features:
                continue  # kept dense: its full-rank basis only spans the outputs seen
            spec_ = spectrum(prepared.statistics[site.target])
            plan[site.target] = Factorization(*projection_factors(site, fetch_attr(prepared.gm, site.weight),
                                                                 spec_, site.full_rank))
        new = factorize_sites(prepared.gm, prepared.sites, plan)
        x = spec.batch(4, torch.Generator().manual_seed(99)) * 3.0
        with torch.no_grad():
            want, got = model(x), new(x)
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(spec.dtype) * (want.abs().max().item() + 1))
        checked.append(len(plan))

    check()
    assert sum(1 for n in checked if n) >= 10, checked


def test_falor_report_totals_match_real_counts() -> None:
    """``fxdeco.convert`` + ``fxdeco.report``: totals and per-layer numbers equal the real ones."""
    outcomes: list[bool] = []

    @settings(max_examples=50, **SETTINGS)
    @given(spec=specs, threshold=st.floats(1e-4, 0.5), data_rank=st.integers(1, 6))
    def prop(spec: Spec, threshold: float, data_rank: int) -> None:
        outcomes.append(_check_convert(spec, threshold, data_rank, capture="symbolic"))

    prop()
    # Only meaningful if falor decomposed layers in a fair share of the examples (and kept some dense).
    assert sum(outcomes) >= 5 and not all(outcomes), outcomes


@settings(max_examples=10, **SETTINGS)
@given(spec=st.one_of(linear_specs(), conv_specs(string_padding=False)), threshold=st.floats(1e-3, 0.5),
       data_rank=st.integers(1, 4))
def test_falor_report_totals_match_real_counts_export_graphs(spec: Spec, threshold: float, data_rank: int) -> None:
    """The same accounting on ``torch.export`` graphs (aten.linear / aten.conv2d with get_attr weights).

    String paddings ('same'/'valid') are left out: see ``test_export_string_padding_conv_is_a_site`` in
    ``tests/passes/test_sites.py``.
    """
    _check_convert(spec, threshold, data_rank, capture="export")


def _check_convert(spec: Spec, threshold: float, data_rank: int, capture: str) -> bool:
    """Run prepare/calibrate/convert and check every count; return whether a layer was decomposed."""
    model = spec.build()
    params_model = sum(p.numel() for p in model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(spec.seed)
    example = spec.batch(2, g, data_rank)
    source: nn.Module = model if capture == "symbolic" else export_capture(model, (example,))
    prepared, _ = calibrated(spec, source, [4, 3, 5], rank=data_rank)
    dense_gm = prepared.gm
    new = fxdeco.convert(prepared, nsr_threshold=threshold)
    rep = fxdeco.report(new)
    decisions = new.meta["fxdeco"].decisions

    # Report totals are the real parameter counts of the models.
    assert rep.totals["params_before"] == params_model
    assert rep.totals["params_after"] == sum(p.numel() for p in new.parameters())
    assert rep.totals["params_after"] == params_model - sum(d.params_before - d.params_after for d in decisions)
    # Report totals of MACs per sample are CostProp's on the dense and factored graphs.
    x = spec.batch(6, torch.Generator().manual_seed(spec.seed + 3), data_rank)
    dense_total = sum(node_macs(dense_gm, x).values()) / x.shape[0]
    new_macs = node_macs(new, x)
    assert rep.totals["macs_before"] == pytest.approx(dense_total, rel=1e-12)
    assert rep.totals["macs_after"] == pytest.approx(sum(new_macs.values()) / x.shape[0], rel=1e-12)

    found = factored_nodes(new)
    assert set(found) == {d.target for d in decisions if d.decomposed}
    for d in decisions:
        row = next(r for r in rep.rows if r["name"] == d.target)
        assert (row["rank"], row["params_before"], row["params_after"]) == (d.rank, d.params_before, d.params_after)
        if not d.decomposed:
            assert d.params_after == d.params_before and d.macs_after == d.macs_before
            continue
        assert d.nsr is not None and d.nsr <= threshold
        assert d.rank * (math.prod(d.weight_shape[1:]) + d.weight_shape[0]) < math.prod(d.weight_shape)
        first_node, second_node = found[d.target]
        a_mod, b_mod = new.get_submodule(first_node.target), new.get_submodule(second_node.target)
        meta = second_node.meta["factored"]
        assert meta.rank == d.rank and meta.method_meta["nsr"] == pytest.approx(d.nsr)
        dense_layer = model.get_submodule(d.target) if hasattr(model, "get_submodule") else None
        if dense_layer is not None:
            assert meta.params_before == d.params_before == sum(p.numel() for p in dense_layer.parameters())
        assert meta.params_after == d.params_after == \
            sum(p.numel() for p in a_mod.parameters()) + sum(p.numel() for p in b_mod.parameters())
        assert tuple(a_mod.weight.shape) == (d.rank, *d.weight_shape[1:])
        assert tuple(b_mod.weight.shape)[:2] == (d.weight_shape[0], d.rank)
        assert (new_macs[first_node.name] + new_macs[second_node.name]) / x.shape[0] == \
            pytest.approx(d.macs_after, rel=1e-12)

    with torch.no_grad():
        out = new(x)
        ref = model(x)
    assert out.dtype == spec.dtype and all(p.dtype == spec.dtype for p in new.parameters())
    assert out.shape == ref.shape
    # The caller's model is untouched.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    return any(d.decomposed for d in decisions)


def test_falor_plan_direct_matches_convert() -> None:
    """``falor_local`` on the prepared statistics is what ``convert`` applies (same ranks, same factors)."""
    spec = Spec("linear", (dict(in_features=16, out_features=12, bias=True),), (16,), torch.float64, 3)
    model = spec.build()
    prepared, _ = calibrated(spec, model, [32, 32], rank=3)
    plan, decisions = falor_local(prepared.gm, prepared.sites, prepared.statistics, nsr_threshold=1e-6)
    assert decisions[0].rank == 3
    new = fxdeco.convert(prepared, nsr_threshold=1e-6)
    torch.testing.assert_close(new.get_submodule("0.0").weight, plan["0"].first)
    torch.testing.assert_close(new.get_submodule("0.1").weight, plan["0"].second)
