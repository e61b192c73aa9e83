"""The pure math of METHODS.md §1–3: norms, attention, the feed-forward block, block composition.

Nothing here imports TransformerLens or anything above it in tl_normmix; the model adapter fills
the types of ``decompose.blocks`` and the engine (``tl_normmix.layer_engine``) names what to
compute.
"""
