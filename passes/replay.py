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

from passes.sites import has_side_effects

# A node output replacement: the reference value in, the value to use downstream out.
Override = Callable[[Any], Any]


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
        self.env: dict[torch.fx.Node, Any] = {}
        self.args_iter = iter(flat_inputs)
        self.next_index = 0  # the first node not yet run
        # Cost accounting of replays: MACs of the nodes they ran (``node.meta["cost"]`` from passes.cost).
        self.replayed_macs = 0

    def _run(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any],
             overrides: Mapping[str, Override] | None = None) -> Any:
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
        # Free what no later node reads (replays start from a copy, so this never touches the walk).
        for used in node.all_input_nodes:
            if self.last_use[used] <= self.position[node] and used in env:
                del env[used]
        return value

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
        env = dict(self.env)
        current = self.order[self.next_index - 1] if self.next_index else None
        if current is not None and current.name in overrides and current in env:
            env[current] = overrides[current.name](env[current])
        output: Any = None
        for node in self.order[self.next_index:]:
            value = self._run(node, env, overrides)
            cost = node.meta.get("cost")
            self.replayed_macs += cost.macs if cost is not None else 0
            if node.op == "output":
                output = value
        return self.module.graph._codegen.process_outputs(output)
