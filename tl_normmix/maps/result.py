"""``MixingMaps``: the one result type every entry point fills (``mixing_maps`` from a cache,
``run_mixing_maps`` during the forward pass, ``value_zeroing``).

Every map keeps the orientation of methods.md#notation: ``[layer, batch, query i, key j]``, rows are
receivers. Layer maps are float32 whatever the cache dtype. Cells that involve a padded token
(query or key outside ``mask``) are zero in the maps and NaN in per-token statistics.

>>> import tl_normmix as nm  # doctest: +SKIP
>>> _, cache = model.run_with_cache(tokens, names_filter=nm.hook_filter(model, "attn_w"))
>>> maps = nm.mixing_maps(model, cache, scopes="attn_w")
>>> maps["attn_w"].shape                       # [layer, batch, query, key]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_normmix.maps.statistics import RowStatistics

__all__ = ["MixingMaps"]


@dataclass(frozen=True, repr=False)
class MixingMaps:
    """Token-to-token context-mixing maps for some layers of one batch.

    Attributes:
        layers: the model layers computed; dimension 0 of every tensor follows this order.
        maps: scope name -> ``[layer, batch, query, key]`` layer map.
        heads: scope name -> ``[layer, batch, head, query, key]`` for scopes with per-head maps.
        value_norms: ``‖f^h(x_j)‖`` as ``[layer, batch, head, key]``, if requested
            (methods.md#attention-weights-and-norms).
        mask: ``[batch, pos]``, True for real tokens, False for padding.
        convention: ``"raw"`` (the papers' unprocessed weights) or ``"processed"`` (folded layer
            norms, centred writing weights, value biases folded into ``b_O``).
        model_name: the model's name as TransformerLens reports it.
        tokens: token ids ``[batch, pos]`` if given.
        str_tokens: token strings per batch row if the model has a tokenizer and tokens were given.
        completeness: whole-layer scope -> ``[layer, batch, pos]`` relative residual
            ``‖Σ_j F_i(x_j) + bias terms − cached output‖ / ‖cached output‖``, like captum's
            convergence delta; NaN at padding (methods.md#the-feed-forward-block).
        causal: whether queries attend only to earlier keys (the model's attention direction).
        verification: layer -> ``{identity: relative error}`` of the self-check
            (``models.checks``); empty when ``verify=False``.
        extras: scope -> name -> a further per-layer product of a method, built on first access
            (``extras["alti"]["residual_share"]`` ``[layer, batch, query]``: the residual part's
            share among the per-head parts of ``heads["alti"]``, the information-flow routes;
            NaN at padding). ``residual_share`` reads it.
        stats: scope -> per-receiver statistics (``run_mixing_maps(..., keep="stats")``: the
            maps themselves are then absent).
    """

    layers: tuple[int, ...]
    maps: dict[str, Float[Tensor, "layer batch query_pos key_pos"]]
    heads: Mapping[str, Float[Tensor, "layer batch head_index query_pos key_pos"]]
    ratios: dict[str, Float[Tensor, "layer batch query_pos"]] = field(repr=False)
    mask: Bool[Tensor, "batch pos"]
    convention: str
    model_name: str
    value_norms: Float[Tensor, "layer batch head_index pos"] | None = None
    tokens: Int[Tensor, "batch pos"] | None = None
    str_tokens: list[list[str]] | None = field(default=None, repr=False)
    completeness: dict[str, Float[Tensor, "layer batch pos"]] = field(
        default_factory=dict, repr=False
    )
    causal: bool = True
    verification: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)
    extras: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict, repr=False)
    stats: dict[str, RowStatistics] = field(default_factory=dict, repr=False)

    def __getitem__(self, scope: str) -> Float[Tensor, "layer batch query_pos key_pos"]:
        if scope not in self.maps and scope in self.stats:
            raise KeyError(
                f"Only statistics of {scope!r} were kept (keep='stats'): read "
                f"maps.stats[{scope!r}] and maps.mixing_ratio; for the N×N maps run "
                "run_mixing_maps(..., keep='maps') "
                "(N² floats per layer and scope)."
            )
        if scope not in self.maps:
            raise KeyError(
                f"Scope {scope!r} was not computed; these were: {', '.join(self.maps)}. "
                f"Pass scopes=(..., {scope!r}) to mixing_maps."
            )
        return self.maps[scope]

    def __contains__(self, scope: object) -> bool:
        return scope in self.maps

    def _summary(self) -> list[tuple[str, str]]:
        batch, pos = self.mask.shape
        layers = list(self.layers)
        span = (
            f"{layers[0]}–{layers[-1]}"
            if layers == list(range(layers[0], layers[-1] + 1))
            else layers
        )
        rows = [
            ("model", self.model_name),
            ("layers", f"{span} ({len(layers)})" if len(layers) > 1 else str(layers[0])),
            ("batch × tokens", f"{batch} × {pos}" + ("" if bool(self.mask.all()) else " (padded)")),
            ("maps", ", ".join(self.maps) or "—"),
            ("per head", ", ".join(self.heads) or "—"),
            (
                "convention",
                f"{self.convention} weights, {'causal' if self.causal else 'bidirectional'}",
            ),
        ]
        if self.stats:
            rows.append(("statistics", ", ".join(self.stats)))
        if self.completeness:
            worst = max(float(r.nan_to_num(0.0).max()) for r in self.completeness.values())
            rows.append(("completeness", f"worst {worst:.1e}"))
        return rows

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value}" for key, value in self._summary())
        return f"MixingMaps({fields})"

    def _repr_html_(self) -> str:
        import html

        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._summary()
        )
        return f"<table><caption>MixingMaps</caption>{body}</table>"

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.maps) or tuple(self.stats)

    @property
    def residual_share(self) -> dict[str, Float[Tensor, "layer batch query_pos"]]:
        """``scope -> [layer, batch, query]``: the residual part's share of each receiver among
        the per-head parts (ALTI's routes), for the scopes that have one."""
        return {s: e["residual_share"] for s, e in self.extras.items() if "residual_share" in e}

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` along dimension 0 of the tensors."""
        if layer not in self.layers:
            raise IndexError(f"Layer {layer} was not computed; these were: {list(self.layers)}.")
        return self.layers.index(layer)

    def mixing_ratio(self, scope: str) -> Float[Tensor, "layer batch query_pos"]:
        """Context-mixing ratio ``r_i`` per receiving token (methods.md#residual-and-layer-norm);
        NaN at padded queries.

        Norm scopes: ``‖Σ_{j≠i} F_i(x_j)‖ / (‖Σ_{j≠i} F_i(x_j)‖ + ‖F_i(x_i)‖)``; ``attn_w``:
        ``Σ_{j≠i} ᾱ_ij``; ``attnres_w``: half of that.
        """
        if scope not in self.ratios:
            self[scope]  # a clear error for scopes that were not computed
        return self.ratios[scope]
