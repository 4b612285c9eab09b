"""Reusable torch.fx passes for low-rank decomposition.

This package knows graphs, not policy: it captures models, finds the nodes
that compute ``y = W x + b`` (Linear / Conv2d "sites"), measures shapes and
costs, accumulates activation statistics and rewrites sites into factored
subgraphs. Which rank each site gets is decided by ``fxdeco``; this package
never imports it.
"""

from passes.capture import CaptureError, GraphTracer, export_capture, training_mode_nodes, symbolic_capture
from passes.cost import CostProp, NodeCost, graph_macs
from passes.inputs import flatten_inputs, fresh_inputs
from passes.lift import lift_parameters
from passes.replay import GraphWalk, RecordedRun
from passes.rewrite import FactoredLayer, Factorization, factorize_sites
from passes.sensitivity import SensitivityInterpreter
from passes.sites import Site, SkippedSite, find_sites, remove_dead_sites
from passes.stats import LeadingDimWeights, SiteStatistics, StatsInterpreter

__all__ = [
    "CaptureError",
    "CostProp",
    "FactoredLayer",
    "Factorization",
    "GraphTracer",
    "GraphWalk",
    "RecordedRun",
    "LeadingDimWeights",
    "NodeCost",
    "Site",
    "SensitivityInterpreter",
    "SiteStatistics",
    "SkippedSite",
    "StatsInterpreter",
    "export_capture",
    "factorize_sites",
    "find_sites",
    "flatten_inputs",
    "fresh_inputs",
    "graph_macs",
    "lift_parameters",
    "remove_dead_sites",
    "training_mode_nodes",
    "symbolic_capture",
]
