"""Run a graph once, node by node, and replay only the rest of it from any point.

A final-output probe ("what does the model output if only this layer's output
changes?") does not need a whole forward pass: everything upstream of the layer
is unchanged. :class:`GraphWalk` runs the reference forward incrementally,
keeping exactly the values that are still needed downstream (as a plain forward
pass does), and :meth:`GraphWalk.replay` re-runs only the nodes after the
current one, with some node outputs replaced. The memory held is that of one
forward pass; the cost of a probe is that of the graph's suffix.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> gm = torch.fx.symbolic_trace(model)
    >>> walk = GraphWalk(gm, [torch.randn(3, 4)])
    >>> _ = walk.advance_to("_0")                        # the first Linear has run
    >>> zeroed = walk.replay({"_0": torch.zeros_like})   # rest of the graph with its output zeroed
    >>> torch.allclose(zeroed, model[2](torch.zeros(3, 4)))
    True
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from passes.inputs import fresh_inputs
from passes.sites import has_side_effects

# A node output replacement: the reference value in, the value to use downstream out.
Override = Callable[[Any], Any]
# A node computation replacement: (the name of the node whose value it reads, the function of that value). The
# node itself is not run (a factored layer computed from the layer's input, instead of the dense layer and a
# projection of its output).
Replacement = tuple[str, Callable[[Any], Any]]


class GraphWalk(torch.fx.Interpreter):
    """An incremental reference run of ``gm`` on one input, with suffix replays.

    ``flat_inputs`` are the placeholder values (``passes.inputs.flatten_inputs``).
    Nodes are run in graph order by :meth:`advance_to`; a value is dropped after
    its last use, so the walk holds what a normal forward pass would.
    """

    def __init__(self, gm: torch.fx.GraphModule, flat_inputs: Sequence[Any]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.order = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.order)}
        self.last_use = {n: max((self.position[u] for u in n.users), default=self.position[n])
                         for n in self.order}
        self.by_name = {n.name: n for n in self.order}
        self.env: dict[torch.fx.Node, Any] = {}
        self.args_iter = iter(fresh_inputs(flat_inputs))  # the walk's own: a forward may change its inputs in place
        self.next_index = 0  # the first node not yet run
        # Cost accounting of replays: MACs of the nodes they ran (``node.meta["cost"]`` from passes.cost).
        self.replayed_macs = 0

    def _run(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any],
             overrides: Mapping[str, Override] | None = None,
             replacements: Mapping[str, Replacement] | None = None) -> Any:
        if replacements and node.name in replacements:
            source, compute = replacements[node.name]
            value = compute(env[self.by_name[source]])
            env[node] = value
            self._free(node, env)
            return value
        if env is not self.env and has_side_effects(node):
            # an in-place op in a replay must not change a value the walk itself holds (a residual input,
            # a site's reference output): it works on a copy
            for used in node.all_input_nodes:
                if used in env and isinstance(env[used], torch.Tensor) and env[used] is self.env.get(used):
                    env[used] = env[used].clone()
        saved, self.env = self.env, env
        try:
            value = self.run_node(node)
        finally:
            self.env = saved
        if overrides and node.name in overrides:
            value = overrides[node.name](value)
        env[node] = value
        self._free(node, env)
        return value

    def _free(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> None:
        """Drop what no later node reads (replays start from a copy, so this never touches the walk)."""
        for used in node.all_input_nodes:
            if self.last_use[used] <= self.position[node] and used in env:
                del env[used]

    def advance_to(self, name: str) -> Any:
        """Run the reference graph up to and including the node ``name``; return its value."""
        target = next((n for n in self.order if n.name == name), None)
        if target is None:
            raise KeyError(f"no node named {name!r} in the graph")
        if self.position[target] < self.next_index:
            raise ValueError(f"the walk is already past node {name!r}; walks only go forward")
        while self.next_index <= self.position[target]:
            node = self.order[self.next_index]
            self._run(node, self.env)
            self.next_index += 1
        return self.env.get(target)

    def replay(self, overrides: Mapping[str, Override]) -> Any:
        """Run the nodes after the current position with ``overrides`` applied; return the graph's output.

        ``overrides`` maps node names to functions of the node's reference
        value. An override of the node the walk stopped at applies to its stored
        value; overrides of later nodes apply when the replay reaches them. The
        walk itself is unchanged.
        """
        return self._replay_after(dict(self.env), self.next_index - 1, overrides)

    def _replay_after(self, env: dict[torch.fx.Node, Any], index: int, overrides: Mapping[str, Override],
                      replacements: Mapping[str, Replacement] | None = None) -> Any:
        """Run the nodes after position ``index`` on ``env`` (the values they read), overrides applied."""
        current = self.order[index] if index >= 0 else None
        if current is not None and current.name in overrides and current in env:
            env[current] = overrides[current.name](env[current])
        output: Any = None
        for node in self.order[index + 1:]:
            value = self._run(node, env, overrides, replacements)
            cost = node.meta.get("cost")
            self.replayed_macs += cost.macs if cost is not None else 0
            if node.op == "output":
                output = value
        return self.module.graph._codegen.process_outputs(output)


class RecordedRun(GraphWalk):
    """A reference run of ``gm`` that can replay the rest of the graph from any of some ``starts`` nodes.

    :class:`GraphWalk` only goes forward; a method that visits layers from the
    last to the first (dwain) needs suffix replays in any order. The reference
    forward runs once, and keeps every value that some replay will read: the
    values computed at or before a start node and read after it (on a
    transformer: the residual stream at each layer, and the layer's own
    output). Memory: those values, not every activation.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> gm = torch.fx.symbolic_trace(model)
        >>> run = RecordedRun(gm, [torch.randn(3, 4)], starts=["_0", "_2"])
        >>> out = run.replay_from("_2", {"_2": torch.zeros_like})   # the last layer's output zeroed
        >>> bool((out == 0).all()), torch.equal(run.replay_from("_0", {}), run.result)
        (True, True)
    """

    def __init__(self, gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], starts: Sequence[str]) -> None:
        super().__init__(gm, flat_inputs)
        missing = [s for s in starts if s not in self.by_name]
        if missing:
            raise KeyError(f"no node named {missing[0]!r} in the graph")
        start_positions = sorted(self.position[self.by_name[s]] for s in starts)

        def read_after_a_start(node: torch.fx.Node) -> bool:
            # the start's own value (replays after it), and what is read at or after it (replays from it)
            p, last = self.position[node], self.last_use[node]
            return any(p == s or p < s <= last for s in start_positions)

        # The recording is a replay of the whole graph whose walk-held values are the kept ones: GraphWalk._run
        # copies a kept value before an in-place op changes it, and frees what no later node reads.
        kept: dict[torch.fx.Node, Any] = {}
        env: dict[torch.fx.Node, Any] = {}
        self.env = kept
        for node in self.order:
            value = self._run(node, env)
            if read_after_a_start(node):
                kept[node] = value
            if node.op == "output":
                self.result = self.module.graph._codegen.process_outputs(value)  # the graph's output
        self.next_index = len(self.order)

    def replay_from(self, start: str, overrides: Mapping[str, Override],
                    replacements: Mapping[str, Replacement] | None = None) -> Any:
        """The graph's output when the nodes after ``start`` run again with ``overrides`` applied.

        ``overrides`` maps node names to functions of the node's value in the
        replay (the reference value for ``start`` itself); nodes before
        ``start`` keep their recorded values. ``replacements`` compute nodes
        from another node's value instead of running them (``start`` included:
        it is then computed from its recorded input). The recording is unchanged.
        """
        node = self.by_name.get(start)
        if node is None:
            raise KeyError(f"no node named {start!r} in the graph")
        at = self.position[node]
        if node not in self.env:
            raise ValueError(f"node {start!r} was not among the starts this run was recorded for")
        if replacements and start in replacements:
            env = {n: v for n, v in self.env.items() if self.position[n] < at <= self.last_use[n]}
            return self._replay_after(env, at - 1, overrides, replacements)
        env = {n: v for n, v in self.env.items() if self.position[n] <= at < self.last_use[n] or n is node}
        return self._replay_after(env, at, overrides, replacements)
