"""``run_mixing_maps``: maps computed during the forward pass, memory set by one layer (METHODS §7).

Every scope of a layer needs only that layer's tensors. Hooks on the model collect them; when the
last one a layer needs has fired, the layer's maps are computed (the same per-layer engine as
``mixing_maps``: ``maps.compute_layer``) and the tensors are let go. So peak memory is the model,
one layer's activations (eager attention's ``[batch, head, N, N]`` pattern is the floor) and what
is kept: the ``N×N`` maps (``keep="maps"``, in ``dtype``) or per-receiver statistics
(``keep="stats"``, ``O(N·top_k)`` per layer and scope: ``row_statistics``). The forward pass stops
as soon as the last requested layer is done (no later block, no unembedding).

>>> maps = nm.run_mixing_maps(model, tokens, ("attn_n", "attnresln_n"))   # doctest: +SKIP
>>> stats = nm.run_mixing_maps(model, long_tokens, keep="stats").stats["attn_n"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from tl_normmix.decompose.whole_layer import DEFAULT_BUDGET_BYTES, available_bytes
from tl_normmix.layer_engine import MapsBuilder, compute_layer, plan_maps
from tl_normmix.maps import MixingMaps
from tl_normmix.models.adapter import ModelAdapter, adapt
from tl_normmix.models.editing import editor
from tl_normmix.row_statistics import RowStatistics, row_statistics, stack_statistics

__all__ = ["estimate_bytes", "run_mixing_maps"]

_OPTIONS = {
    "value_norms",
    "quadrature_points",
    "chunk_size",
    "verify",
    "alti_floor",
    "alti_eps",
    "alti_value_bias",
    "keep_heads",
    "stop_at_layer",
    "window",
    "sink_tokens",
    "check_memory",
}


class _Done(Exception):
    """Raised from a hook once the last requested layer is computed: the rest of the forward
    pass (later blocks, the unembedding) is not needed."""


def run_mixing_maps(
    model: Any,
    tokens: Tensor,
    scopes: str | Iterable[str] = ("attn_n", "attnresln_n"),
    *,
    layers: int | Sequence[int] | None = None,
    keep: str = "maps",
    attention_mask: Tensor | None = None,
    top_k: int = 16,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **mixing_options: Any,
) -> MixingMaps:
    """From tokens to maps in one forward pass, without a cache of every layer.

    Args:
        model: a TransformerLens model (any layout the adapter supports).
        tokens: ``[batch, pos]`` (or ``[pos]``) token ids; at most the model's context length.
        scopes: as for ``mixing_maps``.
        layers: the layers to compute (default: all); the forward pass stops after the last.
        keep: ``"maps"`` — the same ``MixingMaps`` as ``run_with_cache`` + ``mixing_maps``;
            ``"stats"`` — no ``N×N`` output: per layer and scope the mixing ratios and
            ``maps.stats[scope]`` (sink, self and window shares, row entropy, the ``top_k``
            strongest sources per receiver), value norms in ``maps.value_norms``.
        attention_mask: ``[batch, pos]`` padding mask (1 = token), passed to the model; default
            derived from the tokens as TransformerLens does for a padded batch.
        top_k: sources kept per receiver (``keep="stats"``).
        dtype: the dtype of the kept maps (``torch.float16`` halves them); computed in float32.
        progress: a progress bar over the layers.
        **mixing_options: ``value_norms``, ``quadrature_points``, ``chunk_size``, ``verify``,
            ``alti_floor``, ``alti_eps``, ``alti_value_bias`` (as for ``mixing_maps``);
            ``keep_heads`` (default False: per-head maps are ``H`` times the layer maps — True
            keeps them, with ``keep="maps"`` only);
            ``stop_at_layer`` (layers from it on are not run, as in TransformerLens); ``window``
            (128) and ``sink_tokens`` (1) of the statistics; ``check_memory`` (True: estimate
            before the forward pass and refuse what will not fit).
    """
    unknown = set(mixing_options) - _OPTIONS
    if unknown:
        raise TypeError(f"Unknown option(s) {sorted(unknown)}; accepted: {sorted(_OPTIONS)}.")
    if keep not in ("maps", "stats"):
        raise ValueError(f"keep must be 'maps' or 'stats', got {keep!r}.")
    adapter = adapt(model)
    stats = keep == "stats"
    keep_heads = bool(mixing_options.get("keep_heads", False))
    if keep_heads and stats:
        raise ValueError("keep_heads keeps N×N per-head maps: use it with keep='maps'.")
    plan = plan_maps(
        adapter,
        scopes,
        value_norms=bool(mixing_options.get("value_norms", stats)),
        verify=bool(mixing_options.get("verify", True)),
        quadrature_points=mixing_options.get("quadrature_points"),
        chunk_size=mixing_options.get("chunk_size"),
        alti_floor=float(mixing_options.get("alti_floor", 0.0)),
        alti_eps=float(mixing_options.get("alti_eps", 0.0)),
        alti_value_bias=str(mixing_options.get("alti_value_bias", "source")),
    )
    ed = editor(model)
    tokens = (tokens if tokens.ndim == 2 else tokens[None]).to(ed.device)
    _check_length(model, adapter, tokens)
    layer_list = _layers(adapter, layers, mixing_options.get("stop_at_layer"))
    if mixing_options.get("check_memory", True):
        _check_memory(adapter, plan, tokens, layer_list, keep, keep_heads, dtype, top_k)

    roles = plan.roles | {r for r in plan.optional if adapter.has_role(r)}
    wanted = {layer: set(adapter.hook_names(roles, [layer])) for layer in layer_list}
    readers: dict[str, list[int]] = {}
    for layer, names in wanted.items():
        for name in names:
            readers.setdefault(name, []).append(layer)
    captured: dict[int, dict[str, Tensor]] = {layer: {} for layer in layer_list}
    index_of = {layer: index for index, layer in enumerate(layer_list)}
    # a causal model's maps are kept as lower triangles while the forward pass still runs
    pack = adapter.spec.causal and not stats
    builder = MapsBuilder(
        plan, len(layer_list), dtype=dtype, keep_heads=keep_heads, pack_lower=pack
    )
    per_layer: dict[str, list[RowStatistics]] = {s.name: [] for s in plan.scopes}
    state: dict[str, Any] = {"mask": None, "done": 0}
    window = int(mixing_options.get("window", 128))
    sink_tokens = int(mixing_options.get("sink_tokens", 1))
    bar = tqdm(total=len(layer_list), desc="mixing maps", unit="layer", disable=not progress)

    def finish(layer: int) -> None:
        cache = captured.pop(layer)
        result, state["mask"] = compute_layer(
            adapter, plan, cache, layer, state["mask"], attention_mask, tokens
        )
        _release(model, layer, cache)
        del cache
        if stats:
            for name in per_layer:
                statistics = row_statistics(
                    result.maps[name],
                    state["mask"],
                    top_k=top_k,
                    window=window,
                    sink_tokens=sink_tokens,
                )
                per_layer[name].append(statistics)
            result.maps = {}  # only the O(N) parts go on: ratios, value norms, checks
            result.pattern = None
            result.routes = None
        builder.add(index_of[layer], result, layer)
        state["done"] += 1
        bar.update(1)
        if state["done"] == len(layer_list):
            raise _Done

    def reader(name: str) -> Any:
        # keyed by the name asked for: a bridge reports its canonical name for an alias
        def hook(tensor: Tensor, hook: Any) -> None:
            for layer in readers[name]:
                if layer in captured:
                    captured[layer][name] = tensor.detach()
                    if len(captured[layer]) == len(wanted[layer]):
                        finish(layer)

        return hook

    hooks = [(name, reader(name)) for name in readers]
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokens, return_type=None, **ed.mask_kwargs(attention_mask))
        for layer in list(captured):  # hooks that never fired: read what there is
            finish(layer)
    except _Done:
        pass
    finally:
        bar.close()
    mask = state["mask"]
    assert mask is not None
    statistics = {name: stack_statistics(v) for name, v in per_layer.items()} if stats else None
    return builder.build(adapter, tuple(layer_list), mask, tokens, stats=statistics)


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
    keep: str = "maps",
    keep_heads: bool = False,
    itemsize: int = 4,
    model_itemsize: int = 4,
    top_k: int = 16,
) -> int:
    """Peak memory of ``run_mixing_maps`` beyond the model, in bytes: one layer's work (the
    model's scores and pattern, a float32 copy, each scope's float32 map and the statistics'
    running sums, the whole-layer chunk budget) plus what is kept."""
    square = batch * pos * pos
    layer = square * (heads * (2 * model_itemsize + 4) + 4 * (n_scopes + 4))
    layer += DEFAULT_BUDGET_BYTES
    if keep == "maps":
        kept = n_layers * square * itemsize * (n_scopes + (heads if keep_heads else 0))
    else:
        kept = n_layers * batch * pos * n_scopes * (top_k * 8 + 6 * 4)
    return layer + kept


def _check_memory(
    adapter: ModelAdapter,
    plan: Any,
    tokens: Tensor,
    layers: list[int],
    keep: str,
    keep_heads: bool,
    dtype: torch.dtype,
    top_k: int,
) -> None:
    free = available_bytes(tokens.device)
    if free is None:
        return
    batch, pos = tokens.shape
    heads = adapter.spec.block.n_heads
    model_itemsize = torch.finfo(_model_dtype(adapter)).bits // 8

    def need(n: int, how: str) -> int:
        return estimate_bytes(
            batch,
            n,
            heads,
            len(plan.scopes),
            len(layers),
            keep=how,
            keep_heads=keep_heads and how == "maps",
            itemsize=torch.finfo(dtype).bits // 8,
            model_itemsize=model_itemsize,
            top_k=top_k,
        )

    needed = need(pos, keep)
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
        f"{len(plan.scopes)} scope(s) needs about {needed / 2**30:.1f} GiB but "
        f"{free / 2**30:.1f} GiB are free on {tokens.device}: {advice} (or fewer layers)."
    )


def _model_dtype(adapter: ModelAdapter) -> torch.dtype:
    for parameter in adapter.model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
