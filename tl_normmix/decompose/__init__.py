"""The pure math: norms, attention, the feed-forward block, block composition.

Nothing here imports TransformerLens, reads the machine's state or imports anything above it in
tl_normmix; the model adapter fills the types of ``decompose.blocks``, the engine
(``tl_normmix.maps.engine``) names what to compute and passes the chunk sizes of the memory policy
(``tl_normmix.memory``).
"""
