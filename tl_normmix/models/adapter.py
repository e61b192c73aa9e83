"""The model adapter: the only code that knows TransformerLens versions and architectures.

It answers, for a model and its cache, one question per layer: which tensor is the attention
pattern, which are the value vectors, which is the *pure* attention output, which norm reads which
sum with which scale, weight and bias, and how the feed-forward block is built. It hands the math
plain float32 tensors (``decompose.blocks.LayerTensors``) and a ``BlockSpec``.

The structure comes from the model's modules (``models.structure``) and, where nothing marks it,
from one short probe run (``models.probe``); no architecture name decides anything. Each *role*
(``pattern``, ``attn_out``, ``ln2.scale``, ...; listed on ``LayerTensors``) maps to a *source*: a
hook, or a function of hooks and weights where no hook holds the tensor (TransformerLens 2.x's
RMSNorm output, OPT-350m's post-norm input; ``models.sources``). Roles a model cannot provide
are left out, and a scope that needs one is refused with the reason. A feed-forward block without
a closed form is the model's own module as a callable (``models.ff_module``).

Per cache, ``read`` checks shapes (batch and positions agree across roles, the cache covers every
position, a cache without its batch dimension is restored); ``models.checks`` then verifies the
identities that make the maps exact.
"""

from __future__ import annotations

import importlib.metadata
import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.blocks import (
    MULTIPLIER,
    BlockLayout,
    BlockSpec,
    FeedForward,
    LayerTensors,
    MLPSpec,
    NormSpec,
    zeros_if_none,
)
from tl_normmix.models.errors import MissingHookError, UnsupportedModelError
from tl_normmix.models.ff_module import module_ff
from tl_normmix.models.probe import Probe, probe
from tl_normmix.models.sources import Source, sources
from tl_normmix.models.structure import (
    Structure,
    family,
    final_norm_spec,
    norm_spec,
    post_ln,
    read_structure,
)

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


def tl_version() -> str:
    return importlib.metadata.version("transformer_lens")


_ADAPTERS: weakref.WeakKeyDictionary[Any, tuple[tuple[object, ...], ModelAdapter]] = (
    weakref.WeakKeyDictionary()
)


def _continuation_prefix(tokenizer: Any) -> str | None:
    """The mark of a word's continuation tokens where the tokenizer's tokens carry no space
    (WordPiece's ``##``), read from its backend; None for tokenizers whose tokens carry it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    prefix = getattr(getattr(backend, "model", None), "continuing_subword_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


def _word_boundaries(row: list[str], prefix: str, special: set[str]) -> list[str]:
    out = []
    for k, token in enumerate(row):
        if token.startswith(prefix):
            out.append(token[len(prefix) :])
        elif k == 0 or token in special or row[k - 1] in special:
            out.append(token)
        else:
            out.append(" " + token)
    return out


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
        self.sources = sources(model, structure, layout, found)

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
            b_V=self._value_bias(layer, like.device) if "v" in roles else None,
        )

    def _value_bias(self, layer: int, device: torch.device) -> Tensor | None:
        """``b_V`` per key-value head, zero where the model has none; None where the model does
        not expose it (multi-head latent attention)."""
        try:
            b_V = getattr(self.model.blocks[layer].attn, "b_V", None)
        except (NotImplementedError, RuntimeError):  # MLA bridges refuse W_V / b_V
            return None
        kv, d_head = self.spec.block.n_kv_heads, self.spec.block.d_head
        if b_V is None:
            return torch.zeros(kv, d_head, device=device)
        b_V = b_V.detach().float().to(device)
        if b_V.ndim != 2 or b_V.shape[-1] != d_head:
            return None
        if b_V.shape[0] != kv:  # TL 2.x expands grouped values to the query heads
            b_V = b_V[:: b_V.shape[0] // kv]
        return b_V

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
        """Each token as text, word boundaries visible: a WordPiece tokenizer's word-initial
        tokens get the space their word had, its continuations lose their ``##``."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            return None
        rows = tokens if tokens.ndim == 2 else tokens[None]
        strings = [list(self.model.to_str_tokens(row)) for row in rows]
        prefix = _continuation_prefix(tokenizer)
        if prefix is None:
            return strings
        special = set(getattr(tokenizer, "all_special_tokens", []))
        return [_word_boundaries(row, prefix, special) for row in strings]

    # -- the feed-forward block ------------------------------------------------------------------
    def value_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W_V [kv_head, d_model, d_head], b_V [kv_head, d_head])`` of ``layer`` (float32; a
        missing bias is zero). Refused where the values are no linear map of the attention input
        (multi-head latent attention normalises a compressed projection first)."""
        attn = self.model.blocks[layer].attn
        try:
            W_V = attn.W_V
        except NotImplementedError as err:
            raise UnsupportedModelError(
                f"{self.spec.model_name}: {err} The whole-model decomposition needs the values as "
                "a linear map of the attention input; per-layer maps still work."
            ) from None
        W_V = W_V.detach().float()
        kv = self.spec.block.n_kv_heads
        if W_V.shape[0] != kv:  # TL 2.x expands grouped values to the query heads
            W_V = W_V[:: W_V.shape[0] // kv]
        b_V = self._value_bias(layer, W_V.device)
        if b_V is None:
            raise UnsupportedModelError(
                f"{self.spec.model_name}, layer {layer}: b_V is not a [kv_head, d_head] tensor; "
                "the whole-model decomposition cannot split the values."
            )
        return W_V, b_V

    def next_norm(self, layer: int) -> tuple[str, NormSpec]:
        """The first norm that reads the stream after ``layer``'s feed-forward output: its own
        (sandwich), the block's post norm (post-LN), the next block's first norm or the final
        norm; as ``(its module path, its spec)``."""
        layout = self.layout
        for chain in (layout.mlp_out, layout.post):
            names = [n for n in chain if n != MULTIPLIER]
            if names:
                spec = norm_spec(self.model, self.structure, layer, names[0])
                return f"blocks.{layer}.{names[0]}", spec
        following = [n for n in (*layout.attn_in, *layout.attn_out) if n != MULTIPLIER]
        if layer + 1 < self.spec.n_layers and following:
            spec = norm_spec(self.model, self.structure, layer + 1, following[0])
            return f"blocks.{layer + 1}.{following[0]}", spec
        final = self.final_norm()
        if final is None:
            raise ValueError(f"No norm reads the stream after layer {layer}'s feed-forward block.")
        return "ln_final", final

    def final_norm(self) -> NormSpec | None:
        """The norm after the last block (``ln_final``), None if the model has none."""
        return final_norm_spec(self.model, self.structure)

    def feed_forward(self, layer: int) -> FeedForward:
        """The feed-forward block of ``layer``: closed-form ``MLPSpec`` or a generic module."""
        kind = self.structure.mlp_kind_of(layer)
        if kind is None:
            raise UnsupportedModelError(
                f"{self.spec.model_name}: the blocks have no feed-forward part."
            )
        module = self.model.blocks[layer].mlp
        if kind == "module":
            return module_ff(self.model, self.structure, layer)
        act = self._activation(layer)
        if act is None:
            return module_ff(self.model, self.structure, layer)
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
