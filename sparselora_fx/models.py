"""Tiny built-in model configurations: the CLI's default, the tests' fixtures, the demo's base.

Random weights only (nothing is downloaded). Each builder returns a PEFT LoRA model with LoRA on
every linear the architecture has, seeded, so two calls give identical models.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gpt_neox", "opt", "phi3", "gpt2",
                      "bert")


def _tiny_config(arch: str, num_layers: int) -> Any:
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=num_layers, max_position_embeddings=128)
    attn = dict(num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=96, **attn, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(intermediate_size=96, **attn, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(intermediate_size=96, head_dim=16, **attn, **common)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=96, sliding_window=None, **attn, **common)
    if arch == "gemma":
        return tf.GemmaConfig(intermediate_size=96, head_dim=16, **attn, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(intermediate_size=96, head_dim=16, sliding_window=64, **attn, **common)
    if arch == "phi3":
        return tf.Phi3Config(intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, **attn, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(intermediate_size=96, num_attention_heads=4, rotary_pct=0.5, **common)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=num_layers, ffn_dim=96,
                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                            enable_bias=True, pad_token_id=1)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=num_layers, n_head=4, n_inner=96, n_positions=128,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    if arch == "bert":
        return tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=128, num_labels=3)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")


def build_tiny_model(arch: str = "llama", *, num_layers: int = 2, lora_rank: int = 4, lora_alpha: int = 8,
                     lora_dropout: float = 0.0, dtype: torch.dtype = torch.float32, seed: int = 0,
                     init_lora_b: bool = False, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A tiny random-weight ``arch`` model with PEFT LoRA on every linear (eval-free, train mode).

    ``init_lora_b`` gives B a non-zero start (PEFT zeros it), which gradient tests need.
    """
    import peft
    import transformers as tf

    if arch == "gemma2" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # transformers refuses SDPA for Gemma2 (its logit soft-capping)
    config = _tiny_config(arch, num_layers)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "bert":
            model = tf.BertForSequenceClassification(config)
        else:
            model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
            if getattr(model, "loss_type", "") is None:  # GPT2LMHeadModel: the fallback logs, a graph break
                model.loss_type = "ForCausalLM"
        model = model.to(dtype)
        # PEFT's "all-linear" skips the LM head; BERT's classifier is trained in full (modules_to_save).
        extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
        lora = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               target_modules="all-linear", **extra)
        model = peft.get_peft_model(model, lora)
        if init_lora_b:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def tiny_batch(arch: str = "llama", *, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded batch for a tiny model: input_ids and labels (causal LM) or labels per sequence (BERT)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, seq), generator=g)
    if arch == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}
