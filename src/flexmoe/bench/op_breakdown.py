"""Where a step's time goes, by kind of operator, for any MoE implementation alike.

A torch.profiler trace of a few steps; each operator's self time goes to the nearest operator above it
(or itself) whose kind is known, split into forward and backward (an operator under autograd's engine
is backward). einsum is taken whole: what it calls (its bmm) is the one-hot dispatch or combine of
the einsum layers, not expert GEMMs; so is autograd's BmmBackward0, its backward (of the layers
compared here only the einsum ones reach bmm through autograd). What no known operator claims (Python,
the framework) is "other". Kinds are matched by the aten name, so flexmoe, DeepSpeed-MoE and the
einsum layer are cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

__all__ = ["KINDS", "op_breakdown"]

# kind -> aten operators (without "aten::")
KINDS = {
    "gemm": ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "matmul", "linear"),
    "einsum (one-hot dispatch/combine)": ("einsum",),
    "cast": ("_to_copy", "to"),
    "activation": (
        "relu",
        "relu_",
        "gelu",
        "silu",
        "sigmoid",
        "threshold_backward",
        "gelu_backward",
        "silu_backward",
        "sigmoid_backward",
    ),  # fmt: skip
    "gate (softmax, top-k, sort)": (
        "softmax",
        "_softmax",
        "_softmax_backward_data",
        "log_softmax",
        "topk",
        "sort",
        "argsort",
        "cumsum",
        "one_hot",
        "bincount",
        "nonzero",
    ),  # fmt: skip
    "gather/scatter": (
        "index_select",
        "gather",
        "scatter",
        "scatter_",
        "scatter_add",
        "scatter_add_",
        "index",
        "index_put_",
        "index_add",
        "index_add_",
        "embedding",
        "take",
        "index_copy_",
    ),  # fmt: skip
    "copy/fill": ("copy_", "zero_", "fill_", "zeros", "zeros_like", "empty", "cat", "stack", "clone"),
}
_KIND_OF = {f"aten::{op}": kind for kind, ops in KINDS.items() for op in ops}
_OPAQUE = {"einsum (one-hot dispatch/combine)"}  # everything below it is its own


def _kind(event) -> str | None:
    name = event.name
    if name.endswith(": BmmBackward0"):  # einsum's bmm, differentiated (no layer here calls bmm else)
        return "einsum (one-hot dispatch/combine)"
    if name in _KIND_OF:
        return _KIND_OF[name]
    return "element-wise" if name.startswith("aten::") else None


def op_breakdown(step: Callable[[], object], *, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step of `step` by "forward|backward: kind", plus "total" (the traced wall
    time over `steps`). Run it after the step has been warmed up."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.events()
    totals: dict[str, float] = {}
    for event in events:
        kind, backward, node = None, False, event
        while node is not None:
            if node.name.startswith("autograd::engine"):
                backward = True
            node_kind = _kind(node)
            if node_kind in _OPAQUE or (kind is None and node_kind is not None):
                kind = node_kind
            node = node.cpu_parent
        key = f"{'backward' if backward else 'forward'}: {kind or 'other'}"
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
    wall = max(e.time_range.end for e in events) - min(e.time_range.start for e in events) if events else 0
    return {**dict(sorted(totals.items())), "total": wall / 1e3 / steps}
