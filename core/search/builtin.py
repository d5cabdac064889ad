"""The scan units Shears ships: one line per family (a new one is a module plus a line here)."""

from core.search.blocks import BlockUnits
from core.search.channels import ChannelUnits
from core.search.lm import DecoderLayerUnits, LmScanner
from core.search.lm_width import WidthKindUnits
from core.search.nm import NmDecoderLayerUnits, NmWeightUnits
from core.search.scan import Scanner, register_scanner
from core.search.units import register_family
from core.search.weights import WeightUnits

register_family(ChannelUnits())
register_family(WeightUnits())
register_family(DecoderLayerUnits())
register_family(WidthKindUnits())
register_family(NmWeightUnits())
register_family(NmDecoderLayerUnits())
register_family(BlockUnits())
register_scanner("pt2", Scanner.open, reads_targets=True)
register_scanner("hf", LmScanner.open, reads_targets=False)
