"""thresholds.py's computation from plain values: the script runs it, and so does the one pass in a
child process (rtn / SqueezeLLM thresholds depend on the original model only, so they need not
wait for, or compete with, the quantization)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.calib.activation_stats import layer_thresholds
from common.calib.calibration import draw_samples, load_texts, naming
from common.io.model_files import Checkpoint
from common.layers import LayerLayout, find_layers

Thresholds = list[dict[str, torch.Tensor]]  # thresholds.pt: per layer, module -> float32 [in]


@dataclass(frozen=True)
class ThresholdsJob:
    """The model, the calibration text and how to draw and run it (thresholds.py's flags)."""
    model_dir: Path
    dataset: str
    text_column: str | None
    sampling: str  # "reference" | "concat"
    seq_len: int
    num_examples: int
    random_state: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    batch_size: int
    device: str
    trust_remote_code: bool = False
    flag: str = "--model_path"  # how errors name the model

    def samples(self) -> torch.Tensor:
        """The token ids [num_examples, seq_len] the thresholds run over."""
        from common.calib.layerwise import load_tokenizer
        tokenizer = load_tokenizer(self.model_dir, self.trust_remote_code)
        texts = load_texts(self.dataset, self.text_column)
        with naming("--dataset", self.dataset):
            return draw_samples(texts, tokenizer, self.sampling, self.seq_len, self.num_examples, self.random_state)

    def run(self) -> list[dict[str, np.ndarray]]:
        """Everything, from the files: what a child process returns (NumPy: pickled by value)."""
        checkpoint = Checkpoint(self.model_dir, self.flag)
        thresholds = model_thresholds(checkpoint, find_layers(checkpoint), self.samples(), torch.device(self.device),
                                      getattr(torch, self.dtype), self.batch_size, self.trust_remote_code)
        return [{module: values.numpy() for module, values in layer.items()} for layer in thresholds]


def from_arrays(layers: list[dict[str, np.ndarray]]) -> Thresholds:
    return [{module: torch.from_numpy(values) for module, values in layer.items()} for layer in layers]


def model_thresholds(checkpoint: Checkpoint, layout: LayerLayout, samples: torch.Tensor, device: torch.device,
                     dtype: torch.dtype, batch_size: int, trust_remote_code: bool = False,
                     progress: Callable = lambda items, desc: items) -> Thresholds:
    """thresholds.pt's content: the model run a decoder layer at a time over the samples, each layer's
    weights read from disk while the previous one computes."""
    from common.calib.layerwise import LayerwiseModel
    model = LayerwiseModel(checkpoint, layout, device, dtype, trust_remote_code)
    try:
        inputs = model.capture_inputs(list(samples.split(batch_size)))
        model.release_outside_layers()
        thresholds = []
        for index in progress(range(len(layout.layers)), "thresholds layers"):
            layer = model.load_layer(index)
            model.prefetch(index + 1)
            maxima, inputs = layer_thresholds(model, index, layer, inputs, set(layout.layers[index].linears))
            thresholds.append(maxima)
            model.unload_layer(index)
    finally:
        model.close()
    return thresholds
