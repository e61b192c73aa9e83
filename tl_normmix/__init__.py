"""tl_normmix: norm-based context-mixing maps over the TransformerLens cache.

>>> import tl_normmix as nm                                            # doctest: +SKIP
>>> model = nm.load_model("all-MiniLM-L6-v2")
>>> _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, "attn_w"))
>>> maps = nm.mixing_maps(model, cache, scopes="attn_w")
>>> nm.views.heads(maps, "attn_w", layer=0)        # CircuitsVis, offline; nm.plots: matplotlib
"""

import logging as _logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from tl_normmix import analysis, corpus, memory
from tl_normmix.aggregate import ModelDecomposition, decompose_model, rollout
from tl_normmix.analysis import AmplifiedPair, contextualization_change, diff, ff_amplified_pairs
from tl_normmix.interventions.agreement import Agreement, agreement
from tl_normmix.interventions.attribution import EdgeAttribution, edge_attribution
from tl_normmix.interventions.circuits import (
    FaithfulnessCurve,
    KeptCircuit,
    faithfulness_curve,
    keep_only,
)
from tl_normmix.interventions.edges import Edge, EdgeSet, edges
from tl_normmix.interventions.knockout import KnockOut, knock_out
from tl_normmix.interventions.logit_attribution import LogitAttribution, logit_attribution
from tl_normmix.interventions.router_attribution import RouterAttribution, router_attribution
from tl_normmix.interventions.value_zeroing import value_zeroing
from tl_normmix.maps import (
    SCOPES,
    AltiOptions,
    CompletenessWarning,
    FFOptions,
    Method,
    MixingMaps,
    UnsupportedScopeError,
    ValueZeroingOptions,
    hook_filter,
    list_scopes,
    mixing_maps,
    run_mixing_maps,
)
from tl_normmix.models import (
    MissingHookError,
    UnsupportedModelError,
    VerificationError,
    adapt,
    load_model,
    on_hidden_states,
)
from tl_normmix.render import plots, views

# The library logs its fallbacks and choices (INFO) but shows nothing unless asked:
# logging.basicConfig(level=logging.INFO), or a handler on logging.getLogger("tl_normmix").
_logging.getLogger("tl_normmix").addHandler(_logging.NullHandler())

try:
    __version__ = _version("tl_normmix")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "SCOPES",
    "Agreement",
    "AltiOptions",
    "AmplifiedPair",
    "CompletenessWarning",
    "Edge",
    "EdgeAttribution",
    "EdgeSet",
    "FFOptions",
    "FaithfulnessCurve",
    "KeptCircuit",
    "KnockOut",
    "LogitAttribution",
    "Method",
    "MissingHookError",
    "MixingMaps",
    "ModelDecomposition",
    "RouterAttribution",
    "UnsupportedModelError",
    "UnsupportedScopeError",
    "ValueZeroingOptions",
    "VerificationError",
    "__version__",
    "adapt",
    "agreement",
    "analysis",
    "contextualization_change",
    "corpus",
    "decompose_model",
    "diff",
    "edge_attribution",
    "edges",
    "faithfulness_curve",
    "ff_amplified_pairs",
    "hook_filter",
    "keep_only",
    "knock_out",
    "list_scopes",
    "load_model",
    "logit_attribution",
    "memory",
    "mixing_maps",
    "on_hidden_states",
    "plots",
    "rollout",
    "router_attribution",
    "run_mixing_maps",
    "value_zeroing",
    "views",
]
