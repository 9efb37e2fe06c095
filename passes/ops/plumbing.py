"""Shape queries and integer arithmetic on sizes: no tensor axes involved (x.T excepted)."""
from __future__ import annotations

import operator

from pleas_fx.passes.ops.common import unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op


def metadata(ctx, node):
    """Shape queries and integer arithmetic: no tensor axes involved."""
    if node.target is getattr and ctx.is_tensor(node.args[0]) and node.args[1] in ("T", "mT"):
        return list(reversed(ctx.layouts(node.args[0])))
    if ctx.shape() is not None and not isinstance(ctx.shape(), list):
        return unknown(ctx, node, "other", f"{node.target} returning a tensor")
    return None


register_op("size", "dim", "numel", getattr, len, operator.floordiv, operator.mod, spec=OpSpec(infer=metadata))
