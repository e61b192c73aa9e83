"""Random-weight models of known shapes, for benchmarks where a real checkpoint is not at hand
(a GPU machine without the packaged models; contexts longer than a checkpoint's). Speed and
memory depend on the shape, not the weights. Each is saved as a local folder with a word-level
tokenizer and loaded with ``nm.load_model`` like any local model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

import tl_normmix as nm

__all__ = ["random_model"]


def _config(kind: str, n_ctx: int) -> tuple[Any, Any]:
    import transformers as T

    if kind == "gpt2":  # GPT-2 small, context raised to n_ctx
        return T.GPT2Config(n_positions=n_ctx), T.GPT2LMHeadModel
    if kind == "minilm":  # all-MiniLM-L6-v2's shape
        config = T.BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=max(512, n_ctx),
        )
        return config, T.BertModel
    if kind == "smollm2":  # SmolLM2-135M's shape
        config = T.LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=n_ctx,
            tie_word_embeddings=True,
        )
        return config, T.LlamaForCausalLM
    if kind == "llama1b":  # Llama-3.2-1B's shape
        config = T.LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=n_ctx,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        )
        return config, T.LlamaForCausalLM
    if kind == "gpt2-moe":  # GPT-2 small's width and heads, 8 GPT-OSS experts (top 2) per block
        config = T.GptOssConfig(
            hidden_size=768,
            num_hidden_layers=2,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=50257,
            max_position_embeddings=n_ctx,
            sliding_window=n_ctx,
            layer_types=["full_attention", "full_attention"],
        )
        return config, T.GptOssForCausalLM
    raise ValueError(f"unknown shape {kind!r}")


def random_model(
    kind: str,
    n_ctx: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    biases: float = 0.0,
):
    """The TransformerLens model of shape ``kind`` with random weights (seed 0); ``biases``: the
    standard deviation of every bias (the initialisation's are zero)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    config, cls = _config(kind, n_ctx)
    folder = Path(tempfile.mkdtemp(prefix=f"random-{kind}-"))
    torch.manual_seed(0)
    model = cls(config)
    if biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, biases)
    model.save_pretrained(folder)
    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(100)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]").save_pretrained(folder)
    return nm.load_model(str(folder), device=device, dtype=dtype)
