"""Shared fixtures: a tokenizer trained on local text and tiny models of each family we claim."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from common.tiny_models import build_model, local_corpus, train_tokenizer  # noqa: E402
from tests.helpers import rtn_fake_quantize  # noqa: E402

FAMILIES = ["llama", "qwen2", "phi3", "mistral"]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return local_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model_pair(family: str, root: Path, tokenizer) -> tuple[Path, Path]:
    original, quantized = root / family, root / f"{family}-fq"
    if not original.exists():
        build_model(family, original, tokenizer)
        rtn_fake_quantize(original, quantized)
    return original, quantized


@pytest.fixture(scope="session", params=FAMILIES)
def model_pair(request, models_root, tokenizer) -> tuple[str, Path, Path]:
    """(family, original dir, fake-quantized dir) for each family we claim."""
    return (request.param, *_model_pair(request.param, models_root, tokenizer))


@pytest.fixture(scope="session")
def llama_pair(models_root, tokenizer) -> tuple[Path, Path]:
    return _model_pair("llama", models_root, tokenizer)


@pytest.fixture(scope="session")
def phi3_pair(models_root, tokenizer) -> tuple[Path, Path]:
    return _model_pair("phi3", models_root, tokenizer)
