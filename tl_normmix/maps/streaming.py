"""``run_mixing_maps``: maps computed during the forward pass, memory set by one layer.

Every scope of a layer needs only that layer's tensors. Hooks on the model collect them; when the
last one a layer needs has fired, the layer's maps are computed (the same per-layer engine as
``mixing_maps``: ``maps.engine.compute_layer``) and the tensors are let go. So peak memory is the
model, one layer's activations (eager attention's ``[batch, head, N, N]`` pattern is the floor)
and what is kept: the ``N×N`` maps (``keep="maps"``, in ``dtype``) or per-receiver statistics
(``keep="stats"``, ``O(N·top_k)`` per layer and scope: ``maps.statistics``). The forward pass
ends as soon as the last requested layer is done (no later block, no unembedding).

>>> maps = nm.run_mixing_maps(model, tokens, ("attn_n", "attnresln_n"))   # doctest: +SKIP
>>> stats = nm.run_mixing_maps(model, long_tokens, keep="stats").stats["attn_n"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_normmix import memory
from tl_normmix.decompose.whole_layer import hidden_width
from tl_normmix.maps.engine import MapsBuilder, MapsOptions, MapsPlan, compute_layer, plan_maps
from tl_normmix.maps.mask import check_attention_mask, check_tokens
from tl_normmix.maps.methods.whole_layer import pass_bytes, whole_layer_kernel
from tl_normmix.maps.result import MixingMaps
from tl_normmix.maps.statistics import RowStatistics, row_statistics, stack_statistics
from tl_normmix.models.adapter import ModelAdapter, adapt
from tl_normmix.models.editing import editor

__all__ = ["Keep", "estimate_bytes", "run_mixing_maps"]

logger = logging.getLogger("tl_normmix")

#: What ``run_mixing_maps`` keeps of each layer: the ``N×N`` maps or per-receiver statistics.
Keep = Literal["maps", "stats"]


def run_mixing_maps(
    model: Any,
    tokens: Tensor,
    scopes: str | Iterable[str] = ("attn_n", "attnresln_n"),
    *,
    layers: int | Sequence[int] | None = None,
    keep: Keep = "maps",
    attention_mask: Tensor | None = None,
    value_norms: bool | None = None,
    verify: bool = True,
    options: Any = (),
    keep_heads: bool = False,
    dtype: torch.dtype = torch.float32,
    top_k: int = 16,
    window: int = 128,
    sink_tokens: int = 1,
    stop_at_layer: int | None = None,
    check_memory: bool = True,
    progress: bool = False,
) -> MixingMaps:
    """From tokens to maps in one forward pass, without a cache of every layer.

    Args:
        model: a TransformerLens model (any layout the adapter supports).
        tokens: ``[batch, pos]`` (or ``[pos]``) token ids; at most the model's context length.
        scopes: as for ``mixing_maps``.
        layers: the layers to compute (default: all); the forward pass ends after the last.
        keep: ``"maps"`` — the same ``MixingMaps`` as ``run_with_cache`` + ``mixing_maps``;
            ``"stats"`` — no ``N×N`` output: per layer and scope the mixing ratios and
            ``maps.stats[scope]`` (sink, self and window shares, row entropy, the ``top_k``
            strongest sources per receiver), value norms in ``maps.value_norms``.
        attention_mask: ``[batch, pos]`` padding mask (1 = token), passed to the model; default
            derived from the tokens as TransformerLens does for a padded batch.
        value_norms: as for ``mixing_maps`` (default: with ``keep="stats"``).
        verify: as for ``mixing_maps``.
        options: as for ``mixing_maps``.
        keep_heads: keep the factors of per-head maps (``H`` times the layer maps; with
            ``keep="maps"`` only).
        dtype: the dtype of the kept maps (``torch.float16`` halves them); computed in float32.
        top_k: ``keep="stats"``: sources kept per receiver.
        window: ``keep="stats"``: the previous tokens of ``window_share``.
        sink_tokens: ``keep="stats"``: the first tokens of ``sink_share``.
        stop_at_layer: layers from it on are not run (as in TransformerLens).
        check_memory: estimate the peak before the forward pass and refuse what will not fit.
        progress: a progress bar over the layers.
    """
    if keep not in ("maps", "stats"):
        raise ValueError(f"keep must be 'maps' or 'stats', got {keep!r}.")
    if keep_heads and keep == "stats":
        raise ValueError("keep_heads keeps N×N per-head maps: use it with keep='maps'.")
    adapter = adapt(model)
    stats = keep == "stats"
    engine = MapsOptions.of(stats if value_norms is None else value_norms, verify, options)
    plan = plan_maps(adapter, scopes, engine)
    ed = editor(model)
    tokens = check_tokens(tokens).to(ed.device)
    if attention_mask is not None:
        attention_mask = check_attention_mask(attention_mask, tuple(tokens.shape)).long()
    _check_length(model, adapter, tokens)
    layer_list = _layers(adapter, layers, stop_at_layer)
    if check_memory:
        _check_memory(adapter, plan, tokens, layer_list, keep, keep_heads, dtype, top_k)
    stream = _Stream(
        adapter,
        plan,
        layer_list,
        tokens,
        attention_mask,
        MapsBuilder(
            plan,
            len(layer_list),
            dtype=dtype,
            keep_heads=keep_heads,
            # a causal model's maps are kept as lower triangles while the forward pass runs
            pack_lower=adapter.spec.causal and not stats,
        ),
        statistics=_Statistics(top_k, window, sink_tokens) if stats else None,
        progress=progress,
    )
    with torch.no_grad():
        ed.run_until(tokens, stream.hooks(), stream.finished, attention_mask=attention_mask)
    return stream.result()


class _Statistics:
    """Per-receiver statistics of each layer map (``keep="stats"``)."""

    def __init__(self, top_k: int, window: int, sink_tokens: int) -> None:
        self.top_k, self.window, self.sink_tokens = top_k, window, sink_tokens
        self.per_layer: dict[str, list[RowStatistics]] = {}

    def add(self, maps: dict[str, Tensor], mask: Tensor) -> None:
        for name, layer_map in maps.items():
            self.per_layer.setdefault(name, []).append(
                row_statistics(
                    layer_map,
                    mask,
                    top_k=self.top_k,
                    window=self.window,
                    sink_tokens=self.sink_tokens,
                )
            )

    def stacked(self) -> dict[str, RowStatistics]:
        return {name: stack_statistics(v) for name, v in self.per_layer.items()}


class _Stream:
    """Collects each layer's hooks during one forward pass and computes the layer's maps as soon
    as all of them have fired, then lets its tensors go."""

    def __init__(
        self,
        adapter: ModelAdapter,
        plan: MapsPlan,
        layers: list[int],
        tokens: Tensor,
        attention_mask: Tensor | None,
        builder: MapsBuilder,
        *,
        statistics: _Statistics | None,
        progress: bool,
    ) -> None:
        self.adapter, self.plan, self.layers = adapter, plan, layers
        self.tokens, self.attention_mask = tokens, attention_mask
        self.builder, self.statistics = builder, statistics
        roles = plan.roles | {r for r in plan.optional if adapter.has_role(r)}
        self.wanted = {layer: set(adapter.hook_names(roles, [layer])) for layer in layers}
        self.captured: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
        self.mask: Tensor | None = None
        self.done = 0
        self.bar = tqdm(total=len(layers), desc="mixing maps", unit="layer", disable=not progress)

    def finished(self) -> bool:
        return self.done == len(self.layers)

    def hooks(self) -> list[tuple[str, Callable[[Tensor, Any], None]]]:
        readers: dict[str, list[int]] = {}
        for layer, names in self.wanted.items():
            for name in names:
                readers.setdefault(name, []).append(layer)
        return [(name, self._reader(name, at)) for name, at in readers.items()]

    def _reader(self, name: str, layers: list[int]) -> Callable[[Tensor, Any], None]:
        # keyed by the name asked for: a bridge reports its canonical name for an alias
        def hook(tensor: Tensor, hook: Any) -> None:
            for layer in layers:
                if layer in self.captured:
                    self.captured[layer][name] = tensor.detach()
                    if len(self.captured[layer]) == len(self.wanted[layer]):
                        self._finish(layer)

        return hook

    def _finish(self, layer: int) -> None:
        cache = self.captured.pop(layer)
        result, self.mask = compute_layer(
            self.adapter, self.plan, cache, layer, self.mask, self.attention_mask, self.tokens
        )
        _release(self.adapter.model, layer, cache)
        del cache
        if self.statistics is not None:
            self.statistics.add(result.maps, self.mask)
            result.maps = {}  # only the O(N) parts go on: ratios, value norms, checks
        self.builder.add(self.layers.index(layer), result, layer)
        self.done += 1
        self.bar.update(1)

    def result(self) -> MixingMaps:
        for layer in list(self.captured):  # hooks that never fired: read what there is
            self._finish(layer)
        self.bar.close()
        assert self.mask is not None
        stats = self.statistics.stacked() if self.statistics is not None else None
        return self.builder.build(
            self.adapter, tuple(self.layers), self.mask, self.tokens, stats=stats
        )


def _release(model: Any, layer: int, cache: dict[str, Tensor]) -> None:
    """Drop the layer's own references to tensors it handed to the hooks. TransformerLens 4.3's
    joint-QKV attention bridges (GPT-2, GPT-NeoX) keep each layer's pattern as an attribute
    after the forward pass — ``L·H·N²`` floats that would defeat one layer's memory."""
    storages = {t.untyped_storage().data_ptr() for t in cache.values()}
    for module in model.blocks[layer].modules():
        for name, value in list(vars(module).items()):
            if (
                isinstance(value, Tensor)
                and not isinstance(value, torch.nn.Parameter)
                and value.untyped_storage().data_ptr() in storages
            ):
                setattr(module, name, None)


def _check_length(model: Any, adapter: ModelAdapter, tokens: Tensor) -> None:
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"{tokens.shape[-1]} tokens but {adapter.spec.model_name} reads at most {n_ctx}: "
            "shorten the input (tl_normmix never truncates silently)."
        )


def _layers(adapter: ModelAdapter, layers: Any, stop_at_layer: int | None) -> list[int]:
    chosen = adapter.check_layers(layers)
    if stop_at_layer is None:
        return chosen
    beyond = [layer for layer in chosen if layer >= stop_at_layer]
    if layers is not None and beyond:
        raise ValueError(f"Layers {beyond} are at or after stop_at_layer={stop_at_layer}.")
    kept = [layer for layer in chosen if layer < stop_at_layer]
    if not kept:
        raise ValueError(f"stop_at_layer={stop_at_layer} leaves no layer to compute.")
    return kept


def estimate_bytes(
    batch: int,
    pos: int,
    heads: int,
    n_scopes: int,
    n_layers: int,
    *,
    keep: Keep = "maps",
    keep_heads: bool = False,
    itemsize: int = 4,
    model_itemsize: int = 4,
    top_k: int = 16,
    whole_layer: tuple[int, int] | None = None,
) -> int:
    """Peak memory of ``run_mixing_maps`` beyond the model, in bytes: one layer's work (the
    model's scores and pattern, a float32 copy, each scope's float32 map and the statistics'
    running sums; with ``whole_layer=(d_model, hidden)``, the whole-layer pass's values and one
    chunk of receivers as its kernel sizes it) plus what is kept."""
    square = batch * pos * pos
    # per query-key cell: the model's scores and pattern, a float32 copy, each scope's map and
    # about eight float32 temporaries of the maps' and statistics' arithmetic
    layer = square * (heads * (2 * model_itemsize + 4) + 4 * (n_scopes + 8))
    if whole_layer is not None:
        layer += pass_bytes(batch, pos, heads, *whole_layer)
    if keep == "maps":
        kept = n_layers * square * itemsize * (n_scopes + (heads if keep_heads else 0))
    else:
        kept = n_layers * batch * pos * n_scopes * (top_k * 8 + 6 * 4)
    return layer + kept


def _check_memory(
    adapter: ModelAdapter,
    plan: MapsPlan,
    tokens: Tensor,
    layers: list[int],
    keep: Keep,
    keep_heads: bool,
    dtype: torch.dtype,
    top_k: int,
) -> None:
    free = memory.free_bytes(tokens.device)
    if free is None:
        logger.info("run_mixing_maps: free memory unknown on %s; not checked", tokens.device)
        return
    batch, pos = tokens.shape
    heads = adapter.spec.block.n_heads
    model_itemsize = torch.finfo(_model_dtype(adapter)).bits // 8
    whole = None
    if any(m.kernel is whole_layer_kernel for m in plan.methods.values()):
        with_ff = [layer for layer in layers if adapter.structure.mlp_kind_of(layer) is not None]
        if with_ff:
            hidden = max(hidden_width(adapter.feed_forward(layer)) for layer in with_ff)
            whole = (adapter.spec.block.d_model, hidden)

    def need(n: int, how: Keep) -> int:
        return estimate_bytes(
            batch,
            n,
            heads,
            len(plan.methods),
            len(layers),
            keep=how,
            keep_heads=keep_heads and how == "maps",
            itemsize=torch.finfo(dtype).bits // 8,
            model_itemsize=model_itemsize,
            top_k=top_k,
            whole_layer=whole,
        )

    needed = need(pos, keep)
    logger.info(
        "run_mixing_maps: about %.2f GiB needed, %.2f GiB free on %s",
        needed / 2**30,
        free / 2**30,
        tokens.device,
    )
    if needed <= free:
        return
    fits = pos
    while fits > 1 and need(fits, keep) > free:
        fits = int(fits * 0.9)
    advice = f"up to about {fits} tokens would fit"
    if keep == "maps":
        advice += f"; keep='stats' needs about {need(pos, 'stats') / 2**30:.1f} GiB"
    raise MemoryError(
        f"run_mixing_maps(keep={keep!r}) on {batch}×{pos} tokens, {len(layers)} layers, "
        f"{len(plan.methods)} scope(s) needs about {needed / 2**30:.1f} GiB but "
        f"{free / 2**30:.1f} GiB are free on {tokens.device}: {advice} (or fewer layers)."
    )


def _model_dtype(adapter: ModelAdapter) -> torch.dtype:
    for parameter in adapter.model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
