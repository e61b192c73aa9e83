"""The model adapter: the only code that knows TransformerLens versions and architectures.

It answers, for a model and its cache, one question per layer: which tensor is the attention
pattern, which are the value vectors, which is the *pure* attention output, which norm reads which
sum with which scale, weight and bias, and how the feed-forward block is built. It hands the math
plain float32 tensors (``decompose.blocks.LayerTensors``) and a ``BlockSpec``.

The structure comes from the model's modules (``models.structure``) and, where nothing marks it,
from one short probe run (``models.probe``); no architecture name decides anything. Each *role*
(``pattern``, ``attn_out``, ``ln2.scale``, ...; listed on ``LayerTensors``) maps to a *source*: a
hook, or a function of hooks and weights where no hook holds the tensor (TransformerLens 2.x's
RMSNorm output, OPT-350m's post-norm input). Roles a model cannot provide are left out, and a
scope that needs one is refused with the reason.

Per cache, ``read`` checks shapes (batch and positions agree across roles, the cache covers every
position, a cache without its batch dimension is restored); ``models.checks`` then verifies the
identities that make the maps exact.
"""

from __future__ import annotations

import importlib.metadata
import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.blocks import (
    MULTIPLIER,
    BlockLayout,
    BlockSpec,
    FeedForward,
    FFModule,
    LayerTensors,
    MLPSpec,
    zeros_if_none,
)
from tl_normmix.models.errors import MissingHookError, UnsupportedModelError
from tl_normmix.models.probe import Probe, probe
from tl_normmix.models.structure import Structure, family, norm_spec, post_ln, read_structure

__all__ = ["ModelAdapter", "ModelSpec", "adapt", "tl_version"]


@dataclass(frozen=True)
class ModelSpec:
    """What the adapter found out about a model."""

    model_name: str
    architecture: str  # the class TransformerLens reports; for display only
    tl_version: str
    n_layers: int
    block: BlockSpec
    convention: str  # "raw" or "processed"
    causal: bool = True  # queries attend only to earlier keys (False: BERT)
    activation: str | None = None  # the activation found on the model and checked on a run


@dataclass(frozen=True)
class Source:
    """Where a role's tensor comes from: one hook, or ``combine`` of several (``{l}`` = layer)."""

    hooks: tuple[str, ...]
    combine: Callable[[list[Tensor], int], Tensor] | None = None
    by_layer: tuple[tuple[str, ...], ...] | None = None  # per-layer hooks where layers differ

    def names(self, layer: int) -> list[str]:
        hooks = self.by_layer[layer] if self.by_layer is not None else self.hooks
        return [h.format(l=layer) for h in hooks]


def tl_version() -> str:
    return importlib.metadata.version("transformer_lens")


_ADAPTERS: weakref.WeakKeyDictionary[Any, tuple[tuple[object, ...], ModelAdapter]] = (
    weakref.WeakKeyDictionary()
)


def adapt(model: Any) -> ModelAdapter:
    """The adapter for ``model`` (built once per model and weight state: the first call may run
    a short probe), or ``UnsupportedModelError`` naming what is not supported."""
    family(model)  # refuses anything that is not a TransformerLens model
    key = (bool(getattr(model, "_weights_processed", False)), str(model.cfg.normalization_type))
    try:
        cached = _ADAPTERS.get(model)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    adapter = ModelAdapter(model)
    with suppress(TypeError):  # a model that cannot be weakly referenced is not cached
        _ADAPTERS[model] = (key, adapter)
    return adapter


_B = "blocks.{l}."
#: Hook suffixes a probe run tries to cache on a TransformerLens 4.x bridge.
_PROBED = (
    "hook_resid_pre",
    "attn.hook_v",
    "hook_resid_post",
    "attn.o.hook_out",
    "mlp.hook_in",
    "mlp.hook_out",
    "mlp.out.hook_out",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    *(f"{n}.hook_{h}" for n in ("ln1", "ln1_post", "ln2", "ln2_post") for h in ("in", "out")),
)


class ModelAdapter:
    """Reads one model's hooks and weights; see the module docstring."""

    def __init__(self, model: Any) -> None:
        self.model = model
        structure = read_structure(model)
        _refuse_known_defects(model, structure)
        found: Probe | None = None
        layout = structure.layout
        if structure.family == "bridge":
            found = probe(model, structure, _PROBED)
            if found.post_ln:
                layout = post_ln(layout)
        self.structure = structure
        self.probe = found
        self.family = structure.family
        moe = "module" in (structure.mlp_kind, *structure.layer_mlp_kinds)
        if structure.processed and moe and structure.family == "bridge":
            warnings.warn(
                f"{structure.model_name}: TransformerLens's weight processing (compatibility "
                "mode) changes some mixture-of-experts models (log-probabilities moved by 0.4 on "
                "Qwen2-MoE and 1.1 on GPT-OSS against the unprocessed model in our survey): the "
                "maps describe the processed model. Load it without compatibility mode to be sure.",
                stacklevel=3,
            )
        n_heads = structure.n_heads
        block = BlockSpec(
            layout=layout,
            n_heads=n_heads,
            n_kv_heads=_n_kv_heads(model, n_heads),
            d_model=structure.d_model,
            d_head=structure.d_head,
            mlp_kind=structure.mlp_kind,
        )
        activation = None
        if found is not None and found.activation is not None:
            activation = found.activation[0]
        elif structure.family != "bridge" and structure.act_candidates:
            activation = structure.act_candidates[0][0]
        self.spec = ModelSpec(
            model_name=structure.model_name,
            architecture=structure.architecture,
            tl_version=tl_version(),
            n_layers=structure.n_layers,
            block=block,
            convention="processed" if structure.processed else "raw",
            causal=structure.causal,
            activation=activation,
        )
        self.sources = _sources(model, structure, layout, found)

    # -- roles -----------------------------------------------------------------------------------
    @property
    def layout(self) -> BlockLayout:
        return self.spec.block.layout

    def has_role(self, role: str) -> bool:
        return role in self.sources or role == f"{MULTIPLIER}.scale"

    def check_layers(self, layers: int | Iterable[int] | None) -> list[int]:
        n = self.spec.n_layers
        if layers is None:
            return list(range(n))
        chosen = [layers] if isinstance(layers, int) else list(layers)
        bad = [layer for layer in chosen if not -n <= int(layer) < n]
        if bad or not chosen:
            raise IndexError(
                f"Layers {bad or chosen} out of range: this model has layers 0..{n - 1}."
            )
        return sorted({int(layer) % n for layer in chosen})

    def hook_names(self, roles: Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
        """The hook names that realise ``roles`` in ``layers`` (default: all)."""
        names: list[str] = []
        for layer in self.check_layers(list(layers) if layers is not None else None):
            for role in sorted(roles):
                if role == f"{MULTIPLIER}.scale":
                    continue
                names.extend(self._source(role).names(layer))
        return list(dict.fromkeys(names))

    def in_cache(self, cache: Any, role: str, layer: int) -> bool:
        """Whether ``cache`` holds every hook of ``role`` in ``layer``."""
        source = self.sources.get(role)
        return source is not None and all(_has(cache, n) for n in source.names(layer))

    def padding_mask(self, tokens: Tensor) -> Tensor | None:
        """The padding mask TransformerLens builds for a padded batch of ``tokens`` (its
        ``get_attention_mask`` with the tokenizer's pad token and padding side), or None when
        ``tokens`` is a single row, the model has no pad token, or nothing is padding."""
        tokenizer = getattr(self.model, "tokenizer", None)
        rows = tokens if tokens.ndim == 2 else tokens[None]
        if rows.shape[0] < 2 or tokenizer is None or tokenizer.pad_token_id is None:
            return None
        prepend = bool(getattr(self.model.cfg, "default_prepend_bos", True))
        mask = _tl_attention_mask()(tokenizer, rows, prepend).bool()
        return None if bool(mask.all()) else mask

    def _source(self, role: str) -> Source:
        source = self.sources.get(role)
        if source is None:
            raise UnsupportedModelError(
                f"{self.spec.model_name} ({self.layout.name} blocks, TransformerLens "
                f"{self.spec.tl_version}) has no {role!r}: no hook of this model holds it."
            )
        return source

    def read(self, cache: Any, layer: int, roles: Iterable[str]) -> LayerTensors:
        """One layer's tensors for ``roles``, checked against the model's shapes, in float32."""
        roles = sorted(set(roles))
        sources = {r: self._source(r) for r in roles if r != f"{MULTIPLIER}.scale"}
        missing = [n for s in sources.values() for n in s.names(layer) if not _has(cache, n)]
        if missing:
            missing = list(dict.fromkeys(missing))
            raise MissingHookError(
                missing,
                f"The cache lacks {len(missing)} hook(s) needed here: {', '.join(missing)}.",
            )
        batched = bool(getattr(cache, "has_batch_dim", True))
        hooks: dict[str, Tensor] = {}
        dtypes = {cache[n].dtype for s in sources.values() for n in s.names(layer)}
        # the coarsest dtype of the cache sets the tolerance of the self-check
        precision = max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32
        for role, source in sources.items():
            tensors = [_batched(cache[n], batched).detach().float() for n in source.names(layer)]
            tensor = tensors[0] if source.combine is None else source.combine(tensors, layer)
            hooks[role] = tensor
        self._check_shapes(hooks, layer, sources)
        like = next(iter(hooks.values()))
        if f"{MULTIPLIER}.scale" in roles:  # the multiplier is a fixed map: its scale is 1
            stream = hooks["resid_pre"]
            hooks[f"{MULTIPLIER}.scale"] = stream.new_ones(*stream.shape[:2], 1)
        block = self.model.blocks[layer]
        norms = {
            n: norm_spec(self.model, self.structure, layer, n).to(like.device)
            for n in self.layout.norms
            if f"{n}.scale" in roles
        }
        mlp_roles = any(r.startswith("mlp") for r in roles)
        return LayerTensors(
            layer=layer,
            block=self.spec.block,
            hooks=hooks,
            W_O=block.attn.W_O.detach().float().to(like.device),
            b_O=zeros_if_none(getattr(block.attn, "b_O", None), self.spec.block.d_model, like).to(
                like.device
            ),
            norms=norms,
            mlp=self.feed_forward(layer) if mlp_roles else None,
            precision=precision,
        )

    def _check_shapes(
        self, hooks: dict[str, Tensor], layer: int, sources: dict[str, Source]
    ) -> None:
        block = self.spec.block
        name = self.spec.model_name
        for role, tensor in list(hooks.items()):
            hook = sources[role].names(layer)[0]
            want: tuple[int | None, ...]
            if role == "pattern":
                want = (None, block.n_heads, None, None)
            elif role == "v":  # value width from W_O (MLA: v_head_dim differs from d_head)
                d_head = int(self.model.blocks[layer].attn.W_O.shape[1])
                want = (None, None, block.n_kv_heads, d_head)
            elif role.endswith(".scale"):
                if tensor.ndim == 2 and tensor.shape[-1] == 1 and "resid_pre" in hooks:
                    # OPT's pre-LN ln2.hook_scale fires flattened: [batch·pos, 1]
                    like = hooks["resid_pre"]
                    if tensor.shape[0] == like.shape[0] * like.shape[1]:
                        tensor = hooks[role] = tensor.reshape(*like.shape[:2], 1)
                want = (None, None, 1)
            elif role.startswith("mlp_") and role not in ("mlp_out", "mlp_in"):
                want = (None, None, None)
            else:
                want = (None, None, block.d_model)
            got = tuple(tensor.shape)
            if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got, strict=False)
            ):
                raise ValueError(
                    f"Cache tensor {hook} has shape {list(got)}, but {name} expects "
                    f"{['*' if w is None else w for w in want]}: is this cache from a different "
                    "model? (A cache made with remove_batch_dim=True is fine; one made with "
                    "pos_slice is not.)"
                )
        _check_positions(hooks, layer, sources, name)

    def str_tokens(self, tokens: Tensor) -> list[list[str]] | None:
        if getattr(self.model, "tokenizer", None) is None:
            return None
        rows = tokens if tokens.ndim == 2 else tokens[None]
        return [list(self.model.to_str_tokens(row)) for row in rows]

    # -- the feed-forward block ------------------------------------------------------------------
    def feed_forward(self, layer: int) -> FeedForward:
        """The feed-forward block of ``layer``: closed-form ``MLPSpec`` or a generic module."""
        kind = self.structure.mlp_kind_of(layer)
        if kind is None:
            raise UnsupportedModelError(
                f"{self.spec.model_name}: the blocks have no feed-forward part."
            )
        module = self.model.blocks[layer].mlp
        if kind == "module":
            return _module_ff(self.model, self.structure, layer)
        act = self._activation(layer)
        if act is None:
            return _module_ff(self.model, self.structure, layer)
        description, fn = act
        W_in = module.W_in.detach().float()
        W_out = module.W_out.detach().float()
        d = self.spec.block.d_model
        b_in = zeros_if_none(getattr(module, "b_in", None), W_in.shape[1], W_in)
        b_out = zeros_if_none(getattr(module, "b_out", None), d, W_in)
        if kind == "fused_glu":
            gate_first = self.probe is None or self.probe.glu_gate_first
            halves, biases = W_in.chunk(2, dim=-1), b_in.chunk(2)
            gate, linear = halves if gate_first else halves[::-1]
            b_gate, b_lin = biases if gate_first else biases[::-1]
            return MLPSpec(fn, description, linear, b_lin, W_out, b_out, gate, b_gate)
        if kind == "gated":
            W_gate = module.W_gate.detach().float()
            gate_bias = getattr(module, "b_gate", None) if self.family == "bridge" else None
            return MLPSpec(
                fn,
                description,
                W_in,
                b_in,
                W_out,
                b_out,
                W_gate,
                gate_bias.detach().float() if gate_bias is not None else None,
                bias_after_gate=self.family != "bridge",
            )
        return MLPSpec(fn, description, W_in, b_in, W_out, b_out)

    def _activation(self, layer: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
        if self.probe is not None:
            return self.probe.activation
        candidates = self.structure.act_candidates
        return candidates[0] if candidates else None


def _refuse_known_defects(model: Any, structure: Structure) -> None:
    """Configurations TransformerLens 4.3 boots but computes wrongly (its bug, not ours: the
    survey in ``shared/notes/architectures.md`` measured logits 17 off the Hugging Face model)."""
    if structure.family != "bridge":
        return
    config = getattr(getattr(model, "original_model", None), "config", None)
    version = tuple(int(p) for p in tl_version().split(".")[:2] if p.isdigit())
    if getattr(config, "new_decoder_architecture", False) and version <= (4, 3):
        raise UnsupportedModelError(
            f"{structure.model_name}: TransformerLens {tl_version()} splits the grouped "
            "query-key-value weight of Falcon's new decoder architecture (40B/180B, Falcon2) "
            "wrongly, so the model it runs is not the real one (logits differ by ~17 on a tiny "
            "model). Nothing of tl_normmix can be trusted on it; use a TransformerLens release "
            "that fixes this."
        )


def _tl_attention_mask() -> Callable[..., Tensor]:
    """TransformerLens's own ``get_attention_mask`` (``utilities`` in 4.x, ``utils`` in 2.x)."""
    import importlib

    for module in ("transformer_lens.utilities", "transformer_lens.utils"):
        try:
            return importlib.import_module(module).get_attention_mask
        except (ImportError, AttributeError):
            continue
    raise ImportError("TransformerLens has no get_attention_mask")


def _n_kv_heads(model: Any, n_heads: int) -> int:
    value = getattr(model.cfg, "n_key_value_heads", None)
    return int(value) if value else n_heads


def _has(cache: Any, name: str) -> bool:
    try:
        cache[name]
    except KeyError:
        return False
    return True


def _batched(tensor: Tensor, batched: bool) -> Tensor:
    return tensor if batched else tensor.unsqueeze(0)


def _check_positions(
    hooks: dict[str, Tensor], layer: int, sources: dict[str, Source], name: str
) -> None:
    """Every role covers the same batch and every position (a sliced cache is refused)."""
    if "pattern" in hooks:
        pattern = hooks["pattern"]
        if pattern.shape[-2] != pattern.shape[-1]:
            raise ValueError(
                f"{sources['pattern'].names(layer)[0]} has {pattern.shape[-2]} query and "
                f"{pattern.shape[-1]} key positions: the cache was sliced (run_with_cache(..., "
                "pos_slice=...)). tl_normmix needs every position; re-run without pos_slice and "
                "select positions in the maps."
            )
        batch, pos = pattern.shape[0], pattern.shape[-1]
    else:
        first = next(iter(hooks.values()))
        batch, pos = first.shape[0], first.shape[1]
    for role, tensor in hooks.items():
        if role == "pattern":
            continue
        if tensor.shape[0] != batch or tensor.shape[1] != pos:
            raise ValueError(
                f"{sources[role].names(layer)[0]} covers [batch={tensor.shape[0]}, "
                f"pos={tensor.shape[1]}] but the attention pattern covers [batch={batch}, "
                f"pos={pos}]: the cache was sliced (pos_slice) or mixes runs. tl_normmix needs "
                "one run with every position; re-run run_with_cache without pos_slice."
            )


# -- sources -------------------------------------------------------------------------------------
def _sources(
    model: Any, structure: Structure, layout: BlockLayout, found: Probe | None
) -> dict[str, Source]:
    if structure.family == "bridge":
        assert found is not None
        return _bridge_sources(model, structure, layout, found)
    if structure.family == "encoder":
        return _encoder_sources(model, structure)
    return _hooked_sources(model, structure, layout)


def _bridge_sources(
    model: Any, structure: Structure, layout: BlockLayout, found: Probe
) -> dict[str, Source]:
    ok = found.cached

    def hook(suffix: str) -> Source | None:
        return Source((_B + suffix,)) if suffix in ok else None

    out: dict[str, Source | None] = {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",), _heads_second if found.v_heads_first else None),
        "attn_out": Source((_B + "attn.o.hook_out",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
    }
    for norm in (n for n in layout.norms if n != MULTIPLIER):
        out[f"{norm}.scale"] = Source((_B + f"{norm}.hook_scale",))
        out[f"{norm}.in"] = hook(f"{norm}.hook_in")
        out[f"{norm}.out"] = hook(f"{norm}.hook_out")
    if layout.post:
        out["resid_post"] = hook("hook_resid_post") or out[f"{layout.post[-1]}.out"]
    else:
        out["resid_post"] = hook("hook_resid_post")
    kinds = [structure.mlp_kind_of(layer) for layer in range(structure.n_layers)]
    pure = "mlp.out.hook_out"
    if structure.mlp_kind is not None:
        out["mlp_in"] = hook("mlp.hook_in")
        # the pure FF output: mlp.out.hook_out where the MLP has an output projection (BLOOM's
        # mlp.hook_out adds the residual), mlp.hook_out for a mixture of experts
        per_layer = tuple(
            (_B + (pure if f"blocks.{layer}.{pure}" in model.hook_dict else "mlp.hook_out"),)
            for layer in range(structure.n_layers)
        )
        out["mlp_out"] = Source(per_layer[0], by_layer=per_layer)
        if any(kind not in ("module", None) for kind in kinds):
            out["mlp_pre"] = hook("mlp.hook_pre")
            out["mlp_post"] = hook("mlp.hook_post")
            if "gated" in kinds:
                out["mlp_pre_linear"] = hook("mlp.hook_pre_linear")
    if layout.post:
        first = layout.post[0]
        out["post_in"] = out[f"{first}.in"]
        mlp_out = out.get("mlp_out")
        simple = not layout.mlp_in and not layout.mlp_out and out.get("mlp_in") is not None
        if out["post_in"] is None and simple and mlp_out is not None:
            # OPT-350m: caching ln2.hook_in breaks the run; its input is the FF input (the stream
            # after ln1) plus the pure FF output.
            out["post_in"] = Source(
                (_B + "mlp.hook_in", *mlp_out.hooks),
                lambda ts, _: ts[0] + ts[1],
                by_layer=tuple((_B + "mlp.hook_in", *o) for o in mlp_out.by_layer or ()),
            )
    return {role: source for role, source in out.items() if source is not None}


def _hooked_sources(model: Any, structure: Structure, layout: BlockLayout) -> dict[str, Source]:
    """TransformerLens 2.x ``HookedTransformer``: LayerNorm's ``hook_normalized`` is its output
    (γ, β included), RMSNorm's is ``x / s`` (γ not included); with sandwich norms
    ``hook_attn_out`` / ``hook_mlp_out`` are after the post-branch norms, so the pure outputs are
    rebuilt from ``hook_z`` and ``mlp.hook_post``."""
    out: dict[str, Source] = {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
        "resid_post": Source((_B + "hook_resid_post",)),
    }
    sandwich = bool(layout.attn_out)
    if sandwich:
        out["attn_out"] = Source(
            (_B + "attn.hook_z",), lambda ts, layer: _attn_from_z(model, ts[0], layer)
        )
    else:
        out["attn_out"] = Source((_B + "hook_attn_out",))
    for norm in layout.norms:
        out[f"{norm}.scale"] = Source((_B + f"{norm}.hook_scale",))
        out[f"{norm}.out"] = _hooked_norm_out(model, norm)
    if structure.mlp_kind is not None:
        if not sandwich:
            out["mlp_out"] = Source((_B + "hook_mlp_out",))
        elif structure.mlp_kind != "module":
            out["mlp_out"] = Source(
                (_B + "mlp.hook_post",), lambda ts, layer: _mlp_from_post(model, ts[0], layer)
            )
        if structure.mlp_kind != "module":
            out["mlp_pre"] = Source((_B + "mlp.hook_pre",))
            out["mlp_post"] = Source((_B + "mlp.hook_post",))
            if structure.mlp_kind == "gated":
                out["mlp_pre_linear"] = Source((_B + "mlp.hook_pre_linear",))
    return out


def _encoder_sources(model: Any, structure: Structure) -> dict[str, Source]:
    """TransformerLens 2.x ``HookedEncoder`` (post-LN): ``hook_resid_mid`` is LN1's input,
    ``hook_resid_post`` LN2's input and ``hook_normalized_resid_post`` the block output."""
    return {
        "pattern": Source((_B + "attn.hook_pattern",)),
        "v": Source((_B + "attn.hook_v",)),
        "attn_out": Source((_B + "hook_attn_out",)),
        "resid_pre": Source((_B + "hook_resid_pre",)),
        "resid_post": Source((_B + "hook_normalized_resid_post",)),
        "post_in": Source((_B + "hook_resid_post",)),
        "ln1.in": Source((_B + "hook_resid_mid",)),
        "ln1.scale": Source((_B + "ln1.hook_scale",)),
        "ln1.out": Source((_B + "ln1.hook_normalized",)),
        "ln2.in": Source((_B + "hook_resid_post",)),
        "ln2.scale": Source((_B + "ln2.hook_scale",)),
        "ln2.out": Source((_B + "ln2.hook_normalized",)),
        "mlp_in": Source((_B + "ln1.hook_normalized",)),
        "mlp_out": Source((_B + "hook_mlp_out",)),
        "mlp_pre": Source((_B + "mlp.hook_pre",)),
        "mlp_post": Source((_B + "mlp.hook_post",)),
    }


def _hooked_norm_out(model: Any, norm: str) -> Source:
    module = getattr(model.blocks[0], norm)
    if type(module).__name__ == "RMSNorm":  # hook_normalized is x / s: γ comes after
        return Source(
            (_B + f"{norm}.hook_normalized",),
            lambda ts, layer: ts[0] * getattr(model.blocks[layer], norm).w.detach().float(),
        )
    return Source((_B + f"{norm}.hook_normalized",))


def _heads_second(tensors: list[Tensor], layer: int) -> Tensor:
    """The MLA bridge's hook_v ``[batch, head, pos, d_head]`` as ``[batch, pos, head, d_head]``."""
    return tensors[0].transpose(1, 2)


def _attn_from_z(model: Any, z: Tensor, layer: int) -> Tensor:
    attn = model.blocks[layer].attn
    W_O = attn.W_O.detach().float()
    return torch.einsum("bphd,hdm->bpm", z, W_O) + attn.b_O.detach().float()


def _mlp_from_post(model: Any, post: Tensor, layer: int) -> Tensor:
    mlp = model.blocks[layer].mlp
    return post @ mlp.W_out.detach().float() + mlp.b_out.detach().float()


def _module_ff(model: Any, structure: Structure, layer: int) -> FFModule:
    """A feed-forward block without a closed form, as a callable on ``[n, d_model]`` vectors:
    the Hugging Face module (TL 4.x) or TransformerLens's (2.x)."""
    mlp = model.blocks[layer].mlp
    module = getattr(mlp, "original_component", None) if structure.family == "bridge" else mlp
    if not callable(module):
        raise UnsupportedModelError(
            f"{structure.model_name}, layer {layer}: the feed-forward module "
            f"({type(mlp).__name__}) cannot be called on its own, so whole-layer scopes are "
            "not available; attention-block scopes still work."
        )
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32

    def forward(u: Tensor) -> Tensor:
        try:
            out = module(u.reshape(1, -1, u.shape[-1]).to(dtype))
        except Exception as err:
            raise UnsupportedModelError(
                f"{structure.model_name}, layer {layer}: the feed-forward module "
                f"({type(module).__name__}) cannot be called on its own ({type(err).__name__}: "
                f"{err}), so whole-layer scopes are not available; attention-block scopes still "
                "work."
            ) from err
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(u.shape).float()

    cfg = model.cfg
    width = int(cfg.d_mlp or 4 * cfg.d_model) * int(getattr(cfg, "experts_per_token", None) or 1)
    return FFModule(
        forward=forward,
        description=f"{type(module).__name__} (generic: quadrature of forward-mode derivatives)",
        width=2 * width,
        forward_ad=_forward_ad_context(model),
    )


def _forward_ad_context(model: Any) -> Callable[[], AbstractContextManager[object]]:
    """Hugging Face mixture-of-experts modules run a grouped GEMM kernel without forward-mode
    derivatives; the reference loop over experts (``experts_implementation="eager"``) computes
    the same function and supports them."""
    original = getattr(model, "original_model", None)
    if original is None or not hasattr(original, "set_experts_implementation"):
        return _nothing

    @contextmanager
    def eager() -> Any:
        before = original.get_experts_implementation()
        if all(v in (None, "eager") for v in before.values()):
            yield
            return
        original.set_experts_implementation("eager")
        try:
            yield
        finally:
            original.set_experts_implementation(before)

    return eager


@contextmanager
def _nothing() -> Any:
    yield
