"""Tiny random-weight models in Hugging Face format, one per supported family.

Tests build what they need here instead of shipping fixtures: a byte-level BPE
tokenizer trained on a few sentences, a ChatML chat template, and a
transformers model of the family saved with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello there! How are you today? I am fine, thank you.",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, \u00fcber, \u65e5\u672c\u8a9e, emoji \U0001f600 and more.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
]

# Small but not trivial: odd hidden sizes (not multiples of 128), GQA, several layers.
FAMILIES: dict[str, dict] = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    "llama-tied": dict(  # SmolLM2 / Llama-3.2 style: tied embeddings, hidden not a multiple of 128
        model_type="llama", hidden_size=72, intermediate_size=136, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        sliding_window=16, rope_theta=10000.0,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=56, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
}

VOCAB_SIZE = 384
MAX_POSITIONS = 256


def build_tokenizer(directory: Path, vocab_size: int = VOCAB_SIZE - 16):
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer


def build_model(directory: Path, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random model of ``family`` (see FAMILIES) with its tokenizer to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.token_to_id("<|im_start|>"),
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: make them matter
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    generation = {"bos_token_id": config.bos_token_id,
                  "eos_token_id": [config.eos_token_id, tokenizer.token_to_id("<|endoftext|>")]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory
