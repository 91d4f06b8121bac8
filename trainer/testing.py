"""A tiny random Llama with a byte-level tokenizer, saved as a local Hugging Face folder.

For tests and quick experiments: ``python -m trainer.run --model <folder>`` works on it in seconds,
offline. Not used by the trainer itself.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def tiny_tokenizer():
    """Byte-level tokenizer: 256 byte tokens plus <s> (BOS), </s> (EOS), <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_folder(path: str, *, hidden_size: int = 32, layers: int = 3, seed: int = 0,
                      intermediate_size: Optional[int] = None, max_positions: int = 512) -> str:
    """Write a random ``LlamaForCausalLM`` (GQA, RMSNorm, SiLU MLP) and its tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
