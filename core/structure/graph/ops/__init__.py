"""The built-in op handlers, one module per family; importing this package registers them.

- :mod:`.elementwise`: unary and binary elementwise ops, softmax, pooling/padding, reductions
- :mod:`.shape`: permute/transpose, (un)squeeze, select/slice, expand, cat, split, reshapes
- :mod:`.layers`: convolutions, linear, embedding (they start channel spaces)
- :mod:`.norm`: batch norm, layer norm
- :mod:`.attention`: scaled_dot_product_attention, matmul, ``nn.MultiheadAttention``

An op none of them registers blocks the channels it touches (see
:mod:`core.structure.graph.registry`).
"""

from core.structure.graph.ops import attention, elementwise, layers, norm, shape

__all__ = ["attention", "elementwise", "layers", "norm", "shape"]
