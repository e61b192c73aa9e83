"""What only a run can tell: a short forward pass of the model on a few token ids.

Three facts are not marked anywhere in a TransformerLens 4.x model and are read from one probe run
(``run_with_cache`` on six token ids, every layer):

* **pre- or post-LN** for plain ``ln1`` + ``ln2`` blocks (OPT-350m and OpenAI-GPT are post-LN
  with nothing in their config or classes to say so): post-LN if ``ln1`` reads
  ``resid_pre + attn_out`` rather than ``resid_pre`` (wrong candidates are off by the size of the
  attention output, right ones by float rounding);
* **the activation**: the first candidate (the MLP module's own callables, then the known ones)
  that reproduces ``mlp.hook_post`` from ``mlp.hook_pre`` in every layer — ``cfg.act_fn`` says
  ``relu`` on BLOOM, Falcon, MPT and OpenAI-GPT, which compute GELU variants;
* **which hooks can be cached**: some never fire (OpenAI-GPT's ``hook_resid_post``) and some make
  ``run_with_cache`` fail when cached (OPT-350m's ``ln2.hook_in``); both are left out of every
  ``hook_filter`` and read from elsewhere.

A model that TransformerLens itself cannot run is refused with TransformerLens's error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_normmix.decompose.activations import is_elementwise
from tl_normmix.models.errors import UnsupportedModelError
from tl_normmix.models.structure import Structure

__all__ = ["Probe", "probe"]

#: Relative error below which a candidate explains a cached tensor (float32 rounding is ~1e-7;
#: wrong candidates are O(1) off). Half-precision models get the looser bound.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
_HALF_TOLERANCE = 2e-2
_CLOSED = ("dense", "gated", "fused_glu")  # feed-forward kinds with an activation to find


@dataclass(frozen=True)
class Probe:
    post_ln: bool
    activation: tuple[str, Callable[[Tensor], Tensor]] | None  # (description, callable)
    glu_gate_first: bool  # fused GLU: act is applied to the first half of hook_pre
    v_heads_first: bool  # hook_v is [batch, head, pos, d_head] (the MLA bridge), not [b, p, h, d]
    cached: frozenset[str]  # hook suffixes ("ln2.hook_in", ...) that fire and can be cached
    broken: frozenset[str]  # hook suffixes that make run_with_cache fail when cached


def _local(name: str) -> str:
    return name.split(".", 2)[2]


def probe(model: Any, structure: Structure, candidates: Iterable[str]) -> Probe:
    """Run ``model`` once on a few tokens, caching the ``candidates`` hook suffixes of every
    layer (``hook_resid_pre``, ``ln1.hook_in``, ...), and read the facts of the module docstring."""
    n_layers = structure.n_layers
    local = sorted(set(candidates))
    known = set(model.hook_dict)
    wanted = [f"blocks.{layer}.{h}" for layer in range(n_layers) for h in local]
    wanted = [name for name in wanted if name in known]
    tokens = _tokens(model)
    broken: set[str] = set()
    cache = _run(model, tokens, wanted)
    if cache is None:  # some hook breaks run_with_cache when cached: find which (layer 0)
        for name in sorted(n for n in known if n.startswith("blocks.0.")):
            if _run(model, tokens, [name]) is None:
                broken.add(_local(name))
        cache = _run(model, tokens, [n for n in wanted if _local(n) not in broken])
        if cache is None:
            _run(model, tokens, [], raise_error=True)
            raise UnsupportedModelError(f"{structure.model_name}: run_with_cache fails.")
    fired = {_local(name) for name in cache if name.startswith("blocks.0.")}
    post = structure.ambiguous and _reads_attention_output(cache, n_layers, structure)
    activation, gate_first = _activation(cache, n_layers, structure)
    v = cache.get("blocks.0.attn.hook_v")
    heads_first = v is not None and v.ndim == 4 and v.shape[1] != tokens.shape[1]
    return Probe(
        post_ln=post,
        activation=activation,
        glu_gate_first=gate_first,
        v_heads_first=heads_first,
        cached=frozenset(fired - broken),
        broken=frozenset(broken),
    )


def _tokens(model: Any) -> Tensor:
    vocab = int(model.cfg.d_vocab)
    heads = {int(model.cfg.n_heads), int(getattr(model.cfg, "n_key_value_heads", None) or 0)}
    length = next(n for n in (7, 11, 13) if n not in heads)  # tells positions from heads apart
    ids = [(11 + 37 * k) % vocab for k in range(length)]
    device = getattr(model.cfg, "device", None) or "cpu"
    return torch.tensor([ids], device=device)


def _run(
    model: Any, tokens: Tensor, names: list[str], *, raise_error: bool = False
) -> dict[str, Tensor] | None:
    chosen = frozenset(names)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in chosen)
    except Exception as err:
        if raise_error:
            raise UnsupportedModelError(
                f"{getattr(model.cfg, 'model_name', type(model).__name__)}: TransformerLens "
                f"cannot run this model ({type(err).__name__}: {err}); tl_normmix needs "
                "run_with_cache to work."
            ) from err
        return None
    return dict(cache.items())


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reads_attention_output(cache: dict[str, Tensor], n_layers: int, s: Structure) -> bool:
    """Post-LN if ``ln1`` reads ``resid_pre + attn_out`` in every layer (pre-LN: ``resid_pre``)."""
    votes = []
    for layer in range(n_layers):
        prefix = f"blocks.{layer}."
        names = [prefix + h for h in ("hook_resid_pre", "ln1.hook_in", "attn.o.hook_out")]
        if not all(name in cache for name in names):
            continue
        r, x, a = (cache[name].float() for name in names)
        votes.append(_rel(r + a, x) < _rel(r, x))
    if not votes:
        raise UnsupportedModelError(
            f"{s.model_name}: cannot tell whether its blocks are pre- or post-LN (the probe run "
            "did not cache hook_resid_pre, ln1.hook_in and attn.o.hook_out)."
        )
    if len(set(votes)) > 1:
        raise UnsupportedModelError(
            f"{s.model_name}: some blocks read the layer norm before attention and some after; "
            "mixed layouts are not supported."
        )
    return votes[0]


def _activation(
    cache: dict[str, Tensor], n_layers: int, s: Structure
) -> tuple[tuple[str, Callable[[Tensor], Tensor]] | None, bool]:
    closed = [layer for layer in range(n_layers) if s.mlp_kind_of(layer) in _CLOSED]
    if not closed:
        return None, False
    kind = s.mlp_kind_of(closed[0])
    pairs = []
    for layer in closed:
        prefix = f"blocks.{layer}.mlp."
        pre, post = cache.get(prefix + "hook_pre"), cache.get(prefix + "hook_post")
        linear = cache.get(prefix + "hook_pre_linear")
        if pre is not None and post is not None:
            pairs.append((pre.float(), linear.float() if linear is not None else None, post))
    if not pairs:
        return None, False
    tolerance = _TOLERANCE.get(pairs[0][2].dtype, _HALF_TOLERANCE)
    for description, act in s.act_candidates:
        if not is_elementwise(act):
            continue
        for gate_first in (True, False) if kind == "fused_glu" else (True,):
            if all(
                _rel(_hidden(act, pre, linear, kind, gate_first), post.float()) < tolerance
                for pre, linear, post in pairs
            ):
                return (description, act), gate_first
    return None, False


def _hidden(
    act: Callable[[Tensor], Tensor],
    pre: Tensor,
    linear: Tensor | None,
    kind: str | None,
    gate_first: bool,
) -> Tensor:
    with torch.no_grad():
        if kind == "fused_glu":
            first, second = pre.chunk(2, dim=-1)
            return act(first) * second if gate_first else act(second) * first
        if kind == "gated" and linear is not None:
            return act(pre) * linear
        return act(pre)
