"""Architecture adapters: the only place that knows ``layer_idx``, ``layer_types``, channel groups and config fields.

``families`` describes each model family as data; ``adapter.ArchAdapter`` applies a family to a loaded model.
"""

from .adapter import ArchAdapter, layer_state, load_layer_state, param_count, window_states
from .families import (
    BIAS,
    FAMILIES,
    NORM,
    PROJECTION,
    SUPPORTED_MODEL_TYPES,
    Branch,
    Family,
    family_for,
    text_config,
)

__all__ = [
    "ArchAdapter", "layer_state", "load_layer_state", "param_count", "window_states", "BIAS", "FAMILIES", "NORM", "PROJECTION",
    "SUPPORTED_MODEL_TYPES", "Branch", "Family", "family_for", "text_config",
]
