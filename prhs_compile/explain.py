"""``prhs_compile.explain``: what the backend does to a model's graphs, without guessing."""

from __future__ import annotations

import dataclasses

import torch

from prhs_compile.backend import GraphReport, prhs_backend, report_listeners
from prhs_compile.passes.decide import Decision


_RECOMPILE_LIMIT = 1 << 16


@dataclasses.dataclass
class Explanation:
    graphs: list[GraphReport]
    output: object = None  # what the call returned

    @property
    def decisions(self) -> list[Decision]:
        return [d for g in self.graphs for d in g.decisions]

    @property
    def before(self) -> list[str]:
        return [g.before for g in self.graphs]

    @property
    def after(self) -> list[str]:
        return [g.after for g in self.graphs]

    def __str__(self) -> str:
        parts = []
        for i, g in enumerate(self.graphs):
            parts.append(f"=== graph {i}: decisions ===\n{g}")
            parts.append(f"=== graph {i}: before ===\n{g.before.strip()}")
            parts.append(f"=== graph {i}: after ===\n{g.after.strip()}")
        return "\n\n".join(parts) if parts else "(no graph was compiled)"


def explain(model_or_fn, *args, options: dict | None = None, **kwargs) -> Explanation:
    """Compile ``model_or_fn`` with the ``prhs`` backend, call it once, report every graph.

    ``options`` are the backend options (``inductor`` defaults to False here: the rewrite is
    the same and the call is much faster). The function is compiled afresh, so the reports
    describe exactly this call's graphs. The call runs under the caller's grad mode: call it
    inside ``torch.no_grad()`` as you would decode, or every layer reports autograd.
    """
    options = {"inductor": False, **(options or {})}
    reports: list[GraphReport] = []

    def backend(gm, example_inputs):
        return prhs_backend(gm, example_inputs, options=options)

    report_listeners.append(reports.append)
    try:
        compiled = torch.compile(model_or_fn, backend=backend)
        # Each explain() brings a new backend, hence a new Dynamo cache entry for the model's
        # code; lift the recompile limit so repeated explains never fall back to eager.
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT):
            output = compiled(*args, **kwargs)
    finally:
        report_listeners.remove(reports.append)
    return Explanation(graphs=reports, output=output)
