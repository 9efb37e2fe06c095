"""Every op pleas_fx knows, one module per family, each registering its OpSpec once
(inference, widening, fill, footprint): see registry.py, and docs/DESIGN.md for how to add one."""
from pleas_fx.passes.ops import (  # noqa: F401  (registration on import)
    attention, conv, elementwise, linear, norms, plumbing, pooling, reductions, shape, slicing, timm_layers, windows,
)
from pleas_fx.passes.ops.registry import (
    BlockEmit, OpSpec, Resizing, describe_op, lookup_op, module_spec, overridden_forward, register_handler, register_op,
)

__all__ = ["BlockEmit", "OpSpec", "Resizing", "describe_op", "lookup_op", "module_spec", "overridden_forward",
           "register_handler", "register_op"]
