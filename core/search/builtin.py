"""The scan units Shears ships: one line per family (a new one is a module plus a line here)."""

from core.search.channels import ChannelUnits
from core.search.units import register_family
from core.search.weights import WeightUnits

register_family(ChannelUnits())
register_family(WeightUnits())
