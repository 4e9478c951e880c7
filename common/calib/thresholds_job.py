"""thresholds.py's computation from plain values: the script runs it, and so does the one pass in a
child process (rtn / SqueezeLLM thresholds depend on the original model only, so they need not
wait for, or compete with, the quantization). Imports torch only when run, so the one pass can
start its child before it imports torch itself."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from common.child import ChildProcess

if TYPE_CHECKING:
    import numpy as np
    import torch

    from common.io.model_files import Checkpoint
    from common.layers import LayerLayout


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

    def samples(self) -> "torch.Tensor":
        """The token ids [num_examples, seq_len] the thresholds run over."""
        from common.calib.calibration import draw_samples, load_texts, naming
        from common.calib.layerwise import load_tokenizer
        tokenizer = load_tokenizer(self.model_dir, self.trust_remote_code)
        texts = load_texts(self.dataset, self.text_column)
        with naming("--dataset", self.dataset):
            return draw_samples(texts, tokenizer, self.sampling, self.seq_len, self.num_examples, self.random_state)

    def run(self, imported=None) -> "list[dict[str, np.ndarray]]":
        """Everything, from the files: what a child process returns (NumPy: pickled by value).
        `imported` (an Event) is set once torch and transformers are imported."""
        import torch
        import transformers.modeling_utils  # noqa: F401  (the heavy part of the imports, done now)
        if imported is not None:
            imported.set()

        from common.io.model_files import Checkpoint
        from common.layers import find_layers
        checkpoint = Checkpoint(self.model_dir, self.flag)
        thresholds = model_thresholds(checkpoint, find_layers(checkpoint), self.samples(), torch.device(self.device),
                                      getattr(torch, self.dtype), self.batch_size, self.trust_remote_code)
        return [{module: values.numpy() for module, values in layer.items()} for layer in thresholds]


def from_arrays(layers: "list[dict[str, np.ndarray]]") -> "list[dict[str, torch.Tensor]]":
    import torch
    return [{module: torch.from_numpy(values) for module, values in layer.items()} for layer in layers]


def gpu_present() -> bool:
    """An NVIDIA driver with devices left visible, known without importing torch (which has the last
    word: the one pass stops the child if torch finds no GPU after all)."""
    return Path("/proc/driver/nvidia/version").exists() and os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")


def thresholds_in_child(method: str, requested_device: str | None) -> bool:
    """Whether the one pass runs the rtn / SqueezeLLM thresholds in a child process: on a GPU, where
    the child's imports (15-20 s on some machines) are the longest path, so it starts first; on a
    CPU both would compete for the same cores, so the thresholds run in the layer loop."""
    if method == "awq":  # the scaled model's thresholds: in the loop
        return False
    return requested_device.startswith("cuda") if requested_device else gpu_present()


def start_thresholds_child(job: ThresholdsJob) -> ChildProcess | None:
    """`job` in a child process; None where no child process can start."""
    try:
        return ChildProcess(job.run, name="thresholds", ready=True)
    except (OSError, RuntimeError):
        return None


def model_thresholds(checkpoint: "Checkpoint", layout: "LayerLayout", samples: "torch.Tensor",
                     device: "torch.device", dtype: "torch.dtype", batch_size: int, trust_remote_code: bool = False,
                     progress: Callable = lambda items, desc: items) -> "list[dict[str, torch.Tensor]]":
    """thresholds.pt's content (per layer, module -> float32 [in]): the model run a decoder layer at a
    time over the samples, each layer's weights read from disk while the previous one computes."""
    from common.calib.activation_stats import LayerwiseThresholds
    from common.calib.layerwise import LayerwiseModel
    model = LayerwiseModel(checkpoint, layout, device, dtype, trust_remote_code)
    try:
        thresholds = LayerwiseThresholds(model, samples, batch_size)
        for _ in progress(range(len(layout.layers)), "thresholds layers"):
            thresholds.next_layer()
    finally:
        model.close()
    return thresholds.entries
