"""The maps: the result type, the registry of scopes, the per-layer engine and its two entry
points (``mixing_maps`` from a cache, ``run_mixing_maps`` during the forward pass)."""

from tl_normmix.maps.cached import HookFilter, hook_filter, mixing_maps
from tl_normmix.maps.completeness import CompletenessWarning
from tl_normmix.maps.engine import MapsOptions
from tl_normmix.maps.method import Method, UnsupportedScopeError
from tl_normmix.maps.result import MixingMaps
from tl_normmix.maps.scopes import (
    SCOPES,
    AltiOptions,
    FFOptions,
    ValueZeroingOptions,
    list_scopes,
)
from tl_normmix.maps.statistics import RowStatistics
from tl_normmix.maps.streaming import run_mixing_maps

__all__ = [
    "SCOPES",
    "AltiOptions",
    "CompletenessWarning",
    "FFOptions",
    "HookFilter",
    "MapsOptions",
    "Method",
    "MixingMaps",
    "RowStatistics",
    "UnsupportedScopeError",
    "ValueZeroingOptions",
    "hook_filter",
    "list_scopes",
    "mixing_maps",
    "run_mixing_maps",
]
