"""The pruners Shears ships: one line each (a new pruner is a module plus a line here)."""

from core.pruning.base import register_pruner
from core.pruning.channels import ChannelPruner
from core.pruning.llm import LanguageModelPruner
from core.pruning.llm.structure import StructurePruner
from core.pruning.weights import WeightPruner

register_pruner(WeightPruner())
register_pruner(ChannelPruner())
register_pruner(LanguageModelPruner())
register_pruner(StructurePruner())
