"""Language-model pruning (``hf`` models): magnitude, Wanda and SparseGPT at ``unstructured`` and
``n:m``, calibrated decoder layer by decoder layer.

Modules: :mod:`.layers` (decoder layers and their linears), :mod:`.calibrate` (capturing and
replaying a decoder layer's inputs), :mod:`.masks` (row-wise and n:m masks, Wanda and Hessian
statistics), :mod:`.sparsegpt` (the OBS reconstruction), :mod:`.panels` (its Hessian: the upper
triangle in row panels, factored in place), :mod:`.sequential` (the layer-by-layer loop) and
:mod:`.pruner` (the registered :class:`LanguageModelPruner`). ``width`` and ``depth``:
:mod:`.structure` (the registered ``StructurePruner``), :mod:`.importance`, :mod:`.width`,
:mod:`.depth` and :mod:`.llm_config`.
"""

from core.pruning.llm.calibrate import LayerInputs, capture_inputs
from core.pruning.llm.layers import DecoderLayer, Linear, decoder_layers, prunable_linears, unwrap
from core.pruning.llm.pruner import LanguageModelPruner
from core.pruning.llm.sequential import LinearResult, prune_causal_lm
from core.pruning.llm.sparsegpt import reconstruction_error, sparsegpt

__all__ = [
    "DecoderLayer",
    "LanguageModelPruner",
    "LayerInputs",
    "Linear",
    "LinearResult",
    "capture_inputs",
    "decoder_layers",
    "prunable_linears",
    "prune_causal_lm",
    "reconstruction_error",
    "sparsegpt",
    "unwrap",
]
