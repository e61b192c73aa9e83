"""Tiny offline models of every block layout, for whichever TransformerLens is installed.

Every norm weight is randomised (``1 ± 0.3``; ``0 ± 0.3`` for ``1 + w`` norms, whose weights start
at zero), every bias is ``N(0, 0.1)``, matrices are ``N(0, 1/d)`` (so attention is not uniform) and
embeddings ``N(0, 1)``: with the default initialisation (γ = 1, β = 0, b = 0) bias and convention
mistakes would be invisible.

TransformerLens 4.x: Hugging Face models built from configs (2 layers, d_model 32, 4 heads), saved
to a folder with a word-level tokenizer and booted with ``TransformerBridge.boot_transformers``
(raw), optionally ``enable_compatibility_mode()``. ``FAMILIES`` is the one table of them: the
layout the adapter must find, the feed-forward kind, and the refusals.
TransformerLens 2.x: ``HookedTransformer`` / ``HookedEncoder`` built from configs, optionally
processed with ``process_weights_``.

Built models are cached per (case, dtype): tests must not modify them.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TL_MAJOR = int(importlib.metadata.version("transformer_lens").split(".")[0])
VOCAB = 100
D, H, DH, FF, L, NPOS = 32, 4, 8, 64, 2, 64
_IDS = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    """One tiny architecture: its HF classes and config, and what tl_normmix must find."""

    model_class: str
    config_class: str
    config: dict[str, Any]
    layout: str  # BlockLayout.name the adapter must report
    mlp: str | None  # the feed-forward kind: dense, gated, fused_glu, module
    causal: bool = True
    refused: str | None = None  # a refusal: text the error must contain
    edit: dict[str, Any] = field(default_factory=dict)  # config.json keys set after saving


def _llama_like(**kw: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        max_position_embeddings=NPOS,
        **_IDS,
    )
    return base | kw


def _encoder(**kw: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=FF,
        max_position_embeddings=NPOS,
        **_IDS,
    )
    return base | kw


_GPT2 = dict(n_layer=L, n_embd=D, n_head=H, n_inner=FF, vocab_size=VOCAB, n_positions=NPOS)
_TWO = ["sliding_attention", "full_attention"]

FAMILIES: dict[str, Family] = {
    # the first five: supported since the start
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", _GPT2 | _IDS, "pre_ln", "dense"),
    "bert": Family("BertForMaskedLM", "BertConfig", _encoder(), "post_ln", "dense", causal=False),
    "llama": Family("LlamaForCausalLM", "LlamaConfig", _llama_like(), "pre_ln", "gated"),
    "llama_bias": Family(
        "LlamaForCausalLM",
        "LlamaConfig",
        _llama_like(attention_bias=True, mlp_bias=True),
        "pre_ln",
        "gated",
    ),
    "neox": Family(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        _encoder(use_parallel_residual=True, rotary_pct=0.25),
        "parallel",
        "dense",
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        _llama_like(
            head_dim=DH,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=4,
            hidden_activation="gelu_pytorch_tanh",
        ),
        "sandwich",
        "gated",
    ),
    # pre-LN, RMS, gated
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", _llama_like(), "pre_ln", "gated"),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", _llama_like(head_dim=DH), "pre_ln", "gated"),
    "mistral": Family(
        "MistralForCausalLM", "MistralConfig", _llama_like(sliding_window=4), "pre_ln", "gated"
    ),
    "gemma": Family(
        "GemmaForCausalLM",
        "GemmaConfig",
        _llama_like(head_dim=DH, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh"),
        "pre_ln",
        "gated",
    ),
    "gemma3": Family(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        _llama_like(head_dim=DH, query_pre_attn_scalar=16, sliding_window=4, layer_types=_TWO),
        "sandwich",
        "gated",
    ),
    "olmo": Family(
        "OlmoForCausalLM", "OlmoConfig", _llama_like(num_key_value_heads=H), "pre_ln", "gated"
    ),
    "olmo2": Family(
        "Olmo2ForCausalLM",
        "Olmo2Config",
        _llama_like(num_key_value_heads=H),
        "post_branch_norms",
        "gated",
    ),
    "phi3": Family(
        "Phi3ForCausalLM",
        "Phi3Config",
        _llama_like(num_key_value_heads=H, original_max_position_embeddings=NPOS),
        "pre_ln",
        "gated",
    ),
    "smollm3": Family(
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        _llama_like(no_rope_layer_interval=2),
        "pre_ln",
        "gated",
    ),
    "granite": Family(
        "GraniteForCausalLM",
        "GraniteConfig",
        _llama_like(
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            embedding_multiplier=12.0,
            logits_scaling=8.0,
        ),
        "pre_ln_scaled",
        "gated",
    ),
    "stablelm": Family(
        "StableLmForCausalLM",
        "StableLmConfig",
        _llama_like(num_key_value_heads=H, use_qkv_bias=True, partial_rotary_factor=0.25),
        "pre_ln",
        "gated",
    ),
    "nemotron": Family(
        "NemotronForCausalLM",
        "NemotronConfig",
        _llama_like(hidden_act="relu2", partial_rotary_factor=0.5),
        "pre_ln",
        "dense",
    ),
    # pre-LN, LayerNorm, plain MLP
    "starcoder2": Family(
        "Starcoder2ForCausalLM",
        "Starcoder2Config",
        _llama_like(use_bias=True, sliding_window=None, hidden_act="gelu_pytorch_tanh"),
        "pre_ln",
        "dense",
    ),
    "gpt_bigcode": Family(
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        _GPT2 | _IDS | dict(multi_query=True),
        "pre_ln",
        "dense",
    ),
    "gpt_neo": Family(
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=VOCAB,
            max_position_embeddings=NPOS,
            hidden_size=D,
            num_layers=L,
            attention_types=[[["global", "local"], 1]],
            num_heads=H,
            intermediate_size=FF,
            window_size=4,
            **_IDS,
        ),
        "pre_ln",
        "dense",
    ),
    "bloom": Family(
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=D, n_layer=L, n_head=H, **_IDS),
        "pre_ln",
        "dense",
    ),
    "mpt": Family(
        "MptForCausalLM",
        "MptConfig",
        dict(
            d_model=D, n_heads=H, n_layers=L, expansion_ratio=2, max_seq_len=NPOS, vocab_size=VOCAB
        )
        | _IDS,
        "pre_ln",
        "dense",
    ),
    "opt": Family(
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=L,
            ffn_dim=FF,
            num_attention_heads=H,
            max_position_embeddings=NPOS,
            word_embed_proj_dim=D,
            do_layer_norm_before=True,
            **_IDS,
        ),
        "pre_ln",
        "dense",
    ),
    "neox_seq": Family(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        _encoder(use_parallel_residual=False, rotary_pct=0.25),
        "pre_ln",
        "dense",
    ),
    "modernbert_decoder": Family(
        "ModernBertDecoderForCausalLM",
        "ModernBertDecoderConfig",
        _encoder(local_attention=4, global_attn_every_n_layers=2),
        "pre_ln",
        "fused_glu",
    ),
    # post-LN
    "roberta": Family(
        "RobertaForMaskedLM",
        "RobertaConfig",
        _encoder(max_position_embeddings=NPOS + 4),
        "post_ln",
        "dense",
        causal=False,
    ),
    "opt_post": Family(
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=D,
            num_hidden_layers=L,
            ffn_dim=FF,
            num_attention_heads=H,
            max_position_embeddings=NPOS,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            **_IDS,
        ),
        "post_ln",
        "dense",
    ),
    "openai_gpt": Family(
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        dict(vocab_size=VOCAB, n_positions=NPOS, n_embd=D, n_layer=L, n_head=H, **_IDS),
        "post_ln",
        "dense",
    ),
    # parallel
    "phi": Family(
        "PhiForCausalLM",
        "PhiConfig",
        _encoder(partial_rotary_factor=0.5),
        "parallel_shared_norm",
        "dense",
    ),
    "gptj": Family(
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(vocab_size=VOCAB, n_positions=NPOS, n_embd=D, n_layer=L, n_head=H, rotary_dim=4)
        | dict(n_inner=FF, **_IDS),
        "parallel_shared_norm",
        "dense",
    ),
    "falcon": Family(
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H)
        | dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
        | dict(alibi=False, max_position_embeddings=NPOS, **_IDS),
        "parallel_shared_norm",
        "dense",
    ),
    "cohere": Family(
        "CohereForCausalLM",
        "CohereConfig",
        _llama_like(logit_scale=0.0625),
        "parallel_shared_norm",
        "gated",
    ),
    "stablelm_par": Family(
        "StableLmForCausalLM",
        "StableLmConfig",
        _llama_like(
            num_key_value_heads=H,
            partial_rotary_factor=0.25,
            use_parallel_residual=True,
            qk_layernorm=True,
        ),
        "parallel_shared_norm",
        "gated",
    ),
    # mixture of experts: the generic feed-forward path
    "mixtral": Family(
        "MixtralForCausalLM",
        "MixtralConfig",
        _llama_like(num_local_experts=4, num_experts_per_tok=2),
        "pre_ln",
        "module",
    ),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        _llama_like(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
        "pre_ln",
        "module",
    ),
    "olmoe": Family(
        "OlmoeForCausalLM",
        "OlmoeConfig",
        _llama_like(num_experts=4, num_experts_per_tok=2),
        "pre_ln",
        "module",
    ),
    "gpt_oss": Family(
        "GptOssForCausalLM",
        "GptOssConfig",
        _llama_like(
            head_dim=DH,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=_TWO,
        ),
        "pre_ln",
        "module",
    ),
    # multi-head latent attention (its per-head values are per-token terms); TransformerLens
    # wraps the dense first MLP as a mixture of experts too
    "deepseek_v3": Family(
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        _llama_like(
            num_key_value_heads=H,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            v_head_dim=DH,
            qk_nope_head_dim=4,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        "pre_ln",
        "module",
    ),
    # refused, with the feature named
    "falcon_new": Family(
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=H)
        | dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False)
        | dict(alibi=False, num_ln_in_parallel_attn=2, multi_query=False, **_IDS),
        "parallel",
        "dense",
        refused="new decoder architecture",
    ),
    "t5": Family(
        "T5ForConditionalGeneration",
        "T5Config",
        dict(vocab_size=VOCAB, d_model=D, d_kv=DH, d_ff=FF, num_layers=L, num_heads=H)
        | dict(decoder_start_token_id=0, **_IDS),
        "",
        None,
        refused="encoder–decoder",
    ),
    "codegen": Family(
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(vocab_size=VOCAB, n_positions=NPOS, n_ctx=NPOS, n_embd=D, n_layer=L, n_head=H)
        | dict(rotary_dim=4, n_inner=FF, **_IDS),
        "",
        None,
        refused="TransformerLens cannot run this model",
    ),
    "jamba": Family(
        "JambaForCausalLM",
        "JambaConfig",
        _llama_like(num_experts=2, num_experts_per_tok=1, attn_layer_period=2)
        | dict(attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)
        | dict(mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, use_mamba_kernels=False),
        "",
        None,
        refused="no attention pattern",
    ),
    "mamba": Family(
        "MambaForCausalLM",
        "MambaConfig",
        dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, state_size=4, **_IDS),
        "",
        None,
        refused="no attention pattern",
    ),
}

#: The families each test table runs (refused ones have their own tests).
SUPPORTED = [name for name, family in FAMILIES.items() if family.refused is None]
REFUSED = [name for name, family in FAMILIES.items() if family.refused is not None]


@dataclass(frozen=True)
class Case:
    family: str
    mode: str  # raw or processed

    @property
    def id(self) -> str:
        return f"{self.family}-{self.mode}"

    @property
    def causal(self) -> bool:
        if TL_MAJOR >= 4:
            return FAMILIES[self.family].causal
        return self.family != "bert"


#: TransformerLens 2.x families: what HookedTransformer / HookedEncoder build from a config.
TL2_FAMILIES = {
    "gpt2": "pre_ln",
    "llama": "pre_ln",
    "bert": "post_ln",
    "parallel": "parallel",
    "gemma2": "sandwich",
    "no_norm": "unnormalised",
    "attn_only": "pre_ln_attention_only",
    "moe": "pre_ln",
    "solu_ln": "pre_ln",
}


def cases() -> list[Case]:
    if TL_MAJOR >= 4:
        return [Case(f, m) for f in SUPPORTED for m in ("raw", "processed")]
    out = [Case(f, m) for f in TL2_FAMILIES for m in ("raw", "processed") if f != "bert"]
    return [*out, Case("bert", "raw")]  # HookedEncoder has no weight processing


def convention_of(case: Case) -> str:
    """TL 2.x processing is recognised by its folded norms (LNPre / RMSPre); without norms, or
    with a mixture of experts (whose norms TL 2.x does not fold), nothing marks it."""
    if case.mode == "raw" or (TL_MAJOR < 4 and case.family in ("no_norm", "moe")):
        return "raw"
    return "processed"


def layout_of(case: Case) -> str:
    return FAMILIES[case.family].layout if TL_MAJOR >= 4 else TL2_FAMILIES[case.family]


def mlp_of(case: Case) -> str | None:
    if TL_MAJOR >= 4:
        return FAMILIES[case.family].mlp
    return {"llama": "gated", "gemma2": "gated", "attn_only": None}.get(
        case.family, "module" if case.family in ("moe", "solu_ln") else "dense"
    )


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights 1 ± 0.3 (0 ± 0.3 where they start at zero: a ``1 + w`` norm), every bias
    N(0, 0.1), matrices N(0, 1/d), embeddings N(0, 1), other 1-D parameters + N(0, 0.3)."""
    gen = torch.Generator().manual_seed(1)
    owners: dict[str, torch.nn.Module] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = owners.get(name)
            last = name.split(".")[-1]
            noise = torch.randn(p.shape, generator=gen)
            is_norm = owner is not None and "norm" in type(owner).__name__.lower()
            if last in ("bias", "b") or last.startswith(("b_", "bias")):
                p.copy_(0.1 * noise)
            elif p.ndim == 1 and (is_norm or last == "w"):
                offset = bool((p == 0).all())
                p.copy_((0.0 if offset else 1.0) + 0.3 * noise)
            elif p.ndim == 1:
                p.add_(0.3 * noise)
            elif isinstance(owner, torch.nn.Embedding) or "embed" in name.lower():
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1] if p.shape[-1] > 1 else p.shape[0]))
    return model


# -- TransformerLens 4.x ----------------------------------------------------------------------
def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[UNK]", "<bos>", "<eos>", "<pad>", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({f"t{i}": i for i in range(len(special), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save_hf_folder(family: str, root: Path) -> Path:
    """Build, randomise and save the tiny Hugging Face model of ``family`` under ``root``."""
    import json

    import transformers as T

    spec = _hf_spec(family)
    folder = root / family
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = getattr(T, spec.config_class)(**spec.config)
        model = randomise(getattr(T, spec.model_class)(config).eval())
        model.save_pretrained(folder)
        _word_tokenizer().save_pretrained(folder)
        if spec.edit:
            path = folder / "config.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | spec.edit, indent=1))
    return folder


def _hf_spec(family: str) -> Family:
    if family in FAMILIES:
        return FAMILIES[family]
    if family == "gpt2_wide":  # a different shape, for mismatched-cache tests
        config = _GPT2 | _IDS | dict(n_layer=3, n_embd=48, n_head=6)
        return Family("GPT2LMHeadModel", "GPT2Config", config, "pre_ln", "dense")
    raise ValueError(family)


_BUILT: dict[tuple[Case, torch.dtype], Any] = {}


def build(case: Case, root: Path, dtype: torch.dtype = torch.float32, *, fresh: bool = False):
    """The tiny TransformerLens model of ``case`` (cached: do not modify it; ``fresh`` builds a
    new one)."""
    key = (case, dtype)
    if not fresh and key in _BUILT:
        return _BUILT[key]
    if TL_MAJOR >= 4:
        import warnings

        from transformer_lens.model_bridge import TransformerBridge

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(
                str(save_hf_folder(case.family, root)), dtype=dtype, device="cpu"
            )
            if case.mode == "processed":
                model.enable_compatibility_mode(disable_warnings=True)
    else:
        model = _build_tl2(case, dtype)
    if not fresh:
        _BUILT[key] = model
    return model


# -- TransformerLens 2.x ----------------------------------------------------------------------
def _build_tl2(case: Case, dtype: torch.dtype) -> Any:
    from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=VOCAB, seed=0
    )
    family = case.family
    if family == "gpt2_wide":
        common |= dict(n_layers=3, d_model=48, n_heads=6)
    ln = dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
    llama = dict(
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        final_rms=True,
        n_key_value_heads=2,
    )
    configs: dict[str, dict[str, Any]] = {
        "gpt2": ln,
        "gpt2_wide": ln,
        "llama": llama,
        "parallel": dict(
            act_fn="gelu",
            normalization_type="LN",
            parallel_attn_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=4,
        ),
        "gemma2": llama | dict(act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True),
        "no_norm": ln | dict(normalization_type=None),
        "attn_only": ln | dict(attn_only=True),
        "moe": llama | dict(num_experts=4, experts_per_token=2),
        "solu_ln": ln | dict(act_fn="solu_ln"),
    }
    if family == "bert":
        cfg = HookedTransformerConfig(
            act_fn="gelu", normalization_type="LN", attention_dir="bidirectional", **common
        )
        model = randomise(HookedEncoder(cfg))
    elif family in configs:
        model = randomise(HookedTransformer(HookedTransformerConfig(**common, **configs[family])))
    else:
        raise ValueError(family)
    if case.mode == "processed":
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        model.setup()  # re-register the hooks of the new LNPre / RMSNormPre modules
    return model.to(dtype).eval()


def run_with_cache(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any
):
    """``model.run_with_cache`` with a padding mask, whichever model class it is."""
    if mask is not None:
        key = (
            "one_zero_attention_mask"
            if type(model).__name__ == "HookedEncoder"
            else "attention_mask"
        )
        kwargs[key] = mask
    if "names_filter" not in kwargs and TL_MAJOR >= 4:
        # Hooks TransformerLens cannot cache on this model (OPT-350m's ln2.hook_in) are left out.
        import tl_normmix as nm

        broken = nm.adapt(model).probe.broken
        kwargs["names_filter"] = lambda name: not name.endswith(tuple(broken) or ("\0",))
    with torch.no_grad():
        return model.run_with_cache(tokens, **kwargs)


def drops_causal_mask(model: Any) -> bool:
    """Whether passing an all-ones ``attention_mask`` changes the run (TransformerLens 4.3 then
    runs OpenAI-GPT without its causal mask)."""
    if TL_MAJOR < 4:
        return False
    toks = tokens(2, 5)
    with torch.no_grad():
        plain = model(toks)
        masked = model(toks, attention_mask=torch.ones_like(toks))
    return not torch.allclose(plain, masked, atol=1e-5)


def runs(model: Any) -> bool:
    """Whether TransformerLens itself can run ``model`` (OLMo's LayerNorm fails in bfloat16)."""
    try:
        with torch.no_grad():
            model(tokens(1, 3))
    except Exception:
        return False
    return True


def tokens(batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (batch, pos), generator=gen)
