"""Consumers of maps: the whole-layer analyses (contextualization change, FF amplification,
``diff``), the feed-forward block's vectors and outlier dimensions, per-layer summaries, ranks."""

from tl_normmix.analysis.ff import FFOutliers, FFParts, ff_outlier_dimensions, ff_parts
from tl_normmix.analysis.ranks import spearman, valid_cells
from tl_normmix.analysis.summary import (
    LayerSummary,
    format_table,
    layer_summary,
    mixing_ratio_stats,
    sink_share,
)
from tl_normmix.analysis.whole_layer import (
    FF_STEPS,
    AmplifiedPair,
    contextualization_change,
    diff,
    ff_amplified_pairs,
)

__all__ = [
    "FF_STEPS",
    "AmplifiedPair",
    "FFOutliers",
    "FFParts",
    "LayerSummary",
    "contextualization_change",
    "diff",
    "ff_amplified_pairs",
    "ff_outlier_dimensions",
    "ff_parts",
    "format_table",
    "layer_summary",
    "mixing_ratio_stats",
    "sink_share",
    "spearman",
    "valid_cells",
]
