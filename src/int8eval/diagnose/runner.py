"""Running a suffix of the network from cached values: runs that share a prefix (every layer FP32 up to L, or every
layer INT8 up to L) compute it once, so a per-layer sweep costs about half of running every configuration from the
input."""

from __future__ import annotations

import torch

from int8eval.diagnose.fakequant import FakeQuantModel
from int8eval.errors import ConfigError


class PrefixRunner:
    """Runs a torch.fx GraphModule node range by node range, keeping only the values still needed (the
    'frontier'), so runs that share a prefix compute it once. Without a graph it runs the whole model."""

    def __init__(self, fq: FakeQuantModel) -> None:
        self.fq = fq
        gm = fq.model
        self.graph = isinstance(gm, torch.fx.GraphModule)
        self.start: dict[str, int] = {}
        if not self.graph:
            return
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)}
        self.interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        layers = set(fq.names)
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target in layers and node.target not in self.start:
                self.start[node.target] = i

    def position(self, layer: str) -> int:
        return self.start.get(layer, 0) if self.graph else 0

    def begin(self, x: torch.Tensor) -> dict:
        if not self.graph:
            return {"x": x}
        placeholder = self.nodes[0]
        if placeholder.op != "placeholder" or sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise ConfigError("diagnose supports models with a single input")
        return {placeholder: x}

    def advance(self, env: dict, start: int, stop: int) -> None:
        """Run nodes [start, stop) in `env` (in place) and drop values no node from `stop` on needs."""
        if not self.graph:
            return
        with torch.no_grad():
            self.interp.env = env
            for node in self.nodes[max(start, 1) : stop]:
                env[node] = self.interp.run_node(node)
            for n in [n for n in env if self.last_use[n] < stop]:
                del env[n]

    def finish(self, env: dict, start: int) -> torch.Tensor:
        """The output when the nodes from `start` on are run from a copy of `env` (which is left untouched)."""
        if not self.graph:
            return self.fq(env["x"])
        local = dict(env)
        with torch.no_grad():
            self.interp.env = local
            for node in self.nodes[max(start, 1) :]:
                if node.op == "output":
                    return self.interp.run_node(node)
                local[node] = self.interp.run_node(node)
                for dead in [n for n in node.all_input_nodes if self.last_use[n] <= self.index[node]]:
                    local.pop(dead, None)
        raise RuntimeError("graph has no output node")  # pragma: no cover
