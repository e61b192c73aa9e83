"""Tiny offline models of every supported family, for whichever TransformerLens is installed.

Layer-norm weights and biases and every bias are randomised: with the default initialisation
(γ = 1, β = 0, b = 0) bias and convention mistakes would be invisible.

TransformerLens 4.x: Hugging Face models built from configs, saved to a folder and booted with
``TransformerBridge.boot_transformers`` (raw), optionally ``enable_compatibility_mode()``.
TransformerLens 2.x: ``HookedTransformer`` / ``HookedEncoder`` built from configs, optionally
processed with ``process_weights_``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TL_MAJOR = int(importlib.metadata.version("transformer_lens").split(".")[0])
VOCAB = 100


@dataclass(frozen=True)
class Case:
    family: str  # gpt2, bert, llama, llama_bias, neox, gemma2
    mode: str  # raw or processed

    @property
    def id(self) -> str:
        return f"{self.family}-{self.mode}"

    @property
    def causal(self) -> bool:
        return self.family != "bert"


def cases() -> list[Case]:
    if TL_MAJOR >= 4:
        families = ["gpt2", "bert", "llama", "llama_bias", "neox", "gemma2"]
        return [Case(f, m) for f in families for m in ("raw", "processed")]
    return [Case(f, m) for f in ("gpt2", "llama") for m in ("raw", "processed")] + [
        Case("bert", "raw")  # HookedEncoder has no weight processing
    ]


def _randomise(model: torch.nn.Module, *, norm_offset: bool = False) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            last = name.split(".")[-1]
            if (
                p.ndim == 1
                and ("norm" in low or ".ln" in low or low.startswith("ln"))
                and (last in ("weight", "w"))
            ):
                base = 0.0 if norm_offset else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            elif last == "bias" or last.startswith(("b_", "_b_")) or last == "b":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif TL_MAJOR < 4 and p.ndim >= 2 and "Encoder" in type(model).__name__:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-2] ** 0.5)
    return model


# -- TransformerLens 4.x ----------------------------------------------------------------------
def _hf_model(family: str) -> Any:
    import transformers as T

    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if family == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64)
        )
    if family == "bert":
        cfg = T.BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            **common,
        )
        return T.BertForMaskedLM(cfg)
    if family in ("llama", "llama_bias"):
        bias = family == "llama_bias"
        cfg = T.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            attention_bias=bias,
            mlp_bias=bias,
            **common,
        )
        return T.LlamaForCausalLM(cfg)
    if family == "neox":
        cfg = T.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            use_parallel_residual=True,
            rotary_pct=0.25,
            **common,
        )
        return T.GPTNeoXForCausalLM(cfg)
    if family == "gemma2":
        cfg = T.Gemma2Config(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=4,
            **common,
        )
        return T.Gemma2ForCausalLM(cfg)
    if family == "gpt2_wide":  # a different shape, for mismatched-cache tests
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_layer=3, n_embd=48, n_head=6, vocab_size=VOCAB, n_positions=64)
        )
    if family == "opt":  # an architecture tl_normmix does not support (bad-input tests)
        cfg = T.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            **common,
        )
        return T.OPTForCausalLM(cfg)
    raise ValueError(family)


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )


def save_hf_folder(family: str, root: Path) -> Path:
    """Build, randomise and save the tiny Hugging Face model of ``family`` under ``root``."""
    folder = root / family
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = _randomise(_hf_model(family).eval(), norm_offset=family == "gemma2")
        model.save_pretrained(folder)
        if family != "bert":
            _word_tokenizer().save_pretrained(folder)
    return folder


def build(case: Case, root: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The tiny TransformerLens model of ``case`` (a fresh object every call)."""
    if TL_MAJOR >= 4:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            str(save_hf_folder(case.family, root)), dtype=dtype
        )
        if case.mode == "processed":
            bridge.enable_compatibility_mode(disable_warnings=True)
        return bridge
    return _build_tl2(case, dtype)


# -- TransformerLens 2.x ----------------------------------------------------------------------
def _build_tl2(case: Case, dtype: torch.dtype) -> Any:
    from transformer_lens import HookedEncoder, HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    common = dict(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=VOCAB, seed=0
    )
    if case.family == "gpt2_wide":
        common |= dict(n_layers=3, d_model=48, n_heads=6)
    if case.family in ("gpt2", "gpt2_wide"):
        cfg = HookedTransformerConfig(
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            **common,
        )
        model = _randomise(HookedTransformer(cfg))
    elif case.family == "llama":
        cfg = HookedTransformerConfig(
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            gated_mlp=True,
            final_rms=True,
            n_key_value_heads=2,
            **common,
        )
        model = _randomise(HookedTransformer(cfg))
    elif case.family == "bert":
        cfg = HookedTransformerConfig(
            act_fn="gelu", normalization_type="LN", attention_dir="bidirectional", **common
        )
        model = _randomise(HookedEncoder(cfg))
    elif case.family == "parallel":  # unsupported on TL 2.x (bad-input tests)
        cfg = HookedTransformerConfig(
            act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True, **common
        )
        model = HookedTransformer(cfg)
    else:
        raise ValueError(case.family)
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
    with torch.no_grad():
        return model.run_with_cache(tokens, **kwargs)


def tokens(batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, pos), generator=gen)
