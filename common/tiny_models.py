"""Small seeded models and tokenizers built offline, for the demo and the tests.

Real LLMs have a handful of input channels with huge activations; DecDEC exists because of
them. `build_model` plants such outlier channels (scaled norm weights) so that calibration,
selection and correction behave as they do on real models.
"""
from __future__ import annotations

import inspect
import importlib
from pathlib import Path

import torch

FAMILIES = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2},
    "phi3": {"model_type": "phi3", "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2},
    "qwen3": {"model_type": "qwen3", "num_key_value_heads": 2},
    "gemma2": {"model_type": "gemma2", "num_key_value_heads": 2, "head_dim": 16},
    "gemma3_text": {"model_type": "gemma3_text", "num_key_value_heads": 2, "head_dim": 16},
    "opt": {"model_type": "opt", "ffn_dim": 128, "word_embed_proj_dim": 64},  # biases, final_layer_norm
}
CORPUS_MODULES = ["argparse", "collections", "json", "pathlib", "re", "string", "textwrap", "random",
                  "statistics", "itertools", "functools", "inspect", "logging", "csv", "zipfile",
                  "tarfile", "decimal", "fractions", "datetime", "calendar", "heapq", "bisect", "shutil",
                  "tempfile", "subprocess", "threading", "queue", "socket", "pickle", "copy", "enum",
                  "dataclasses", "contextlib", "abc", "io", "os", "sys", "math", "operator", "unittest"]


def local_corpus() -> list[str]:
    """English passages that ship with Python: the docstrings of standard-library modules."""
    passages: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isroutine(obj)) else None
            if doc and len(doc) > 200 and doc not in passages:
                passages.append(doc)
    return passages


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_config(family: str, vocab_size: int, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, max_positions: int = 512, **overrides):
    from transformers import AutoConfig
    settings = {"tie_word_embeddings": False, **FAMILIES[family], **overrides}
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, **settings)


def plant_outliers(model: torch.nn.Module, channels: tuple[int, ...] = (3, 17, 40), factor: float = 25.0) -> None:
    """Scale a few channels of every norm weight, giving activation outliers like real LLMs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name and param.shape[0] > max(channels):
                param[list(channels)] *= factor


def build_model(family: str, path: Path, tokenizer, dtype: torch.dtype = torch.float16, seed: int = 0,
                outliers: bool = True, max_shard_size: str | int | None = None, **config_overrides):
    """Build a seeded random model of `family`, save it with its tokenizer, return the model."""
    from transformers import AutoModelForCausalLM
    config = tiny_config(family, len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # transformers initializes biases to zero; real ones are not
                param.normal_(0.0, 0.02)
    if outliers:
        plant_outliers(model)
    save_model(model.to(dtype), path, tokenizer, max_shard_size)
    return model


def save_model(model, path: Path, tokenizer=None, max_shard_size: str | int | None = None) -> None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def train_briefly(model, tokenizer, texts: list[str], steps: int, seq_len: int = 128, batch_size: int = 16,
                  lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu", progress=None) -> float:
    """A few hundred AdamW steps of next-token training on `texts`, so perplexities mean something.

    Returns the last training loss. Random windows of the joined texts, seeded.
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for _ in (progress(range(steps)) if progress else range(steps)):
        starts = torch.randint(0, ids.shape[0] - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s: s + seq_len] for s in starts]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())
