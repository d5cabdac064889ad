"""The built-in op handlers, one module per family; importing this package registers them.

- :mod:`.elementwise`: unary and binary elementwise ops, softmax, pooling/padding, reductions
- :mod:`.shape`: permute/transpose, (un)squeeze, select/slice, expand, cat, split, reshapes
- :mod:`.layers`: convolutions, embedding (they start channel spaces)
- :mod:`.projection`: linear layers however spelt (``linear``, ``addmm``/``mm``/``matmul`` against
  a parameter in either layout, ``einsum`` projections)
- :mod:`.norm`: batch norm, layer norm
- :mod:`.attention`: scaled_dot_product_attention, ``nn.MultiheadAttention``, grouped-query
  attention's ``repeat_kv``

An op none of them registers blocks the channels it touches (see
:mod:`core.structure.graph.registry`).
"""

from core.structure.graph.ops import attention, elementwise, layers, norm, projection, shape

__all__ = ["attention", "elementwise", "layers", "norm", "projection", "shape"]
