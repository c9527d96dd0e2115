"""CPU runtimes for the encoders (``embed.text.runtime`` / ``embed.image.runtime``).

``torch`` runs the model as loaded. ``onnx`` runs the same weights in ONNX Runtime: the torch model
is exported once, at first use, to a file beside the model (a ``.prodsim-onnx`` folder next to the
model folder or weights file; ``~/.cache/prodsim/onnx`` where that is not writable), named by the
encoder id's hash, so new weights get a new file and a stale one is never used. ``onnx-int8`` (text)
also quantizes the linear layers' weights to int8, per output channel (ONNX Runtime's dynamic
quantization: activations are quantized on the fly, no calibration data).

Measured on 2 cores (``prodsim bench embed``; docs/benchmarks.md): ``onnx`` is about as fast as torch
for MiniLM and several times faster for EfficientNet-Lite0, with equal vectors (cosine ≥ 0.9999);
``onnx-int8`` about 2.4x torch for MiniLM with vectors at cosine ≈ 0.99 to the float ones.

These are CPU runtimes: on a GPU (``embed.device`` cuda, or auto with a GPU) ``onnx`` runs the torch
model in fp16 as ``torch`` does (same vectors), and ``onnx-int8`` is refused (its vectors differ, and
its encoder id says so).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

from prodsim_spark.errors import ModelError

log = logging.getLogger(__name__)

CACHE_FOLDER = ".prodsim-onnx"


def onnx_file(encoder_id: str, beside: Path, variant: str) -> Path:
    """Where the ONNX export of ``encoder_id`` lives: beside the model when that folder is writable."""
    name = f"{hashlib.sha1(encoder_id.encode()).hexdigest()[:16]}-{variant}.onnx"
    for folder in (beside / CACHE_FOLDER, Path.home() / ".cache" / "prodsim" / "onnx"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK) or (folder / name).is_file():
            return folder / name
    raise ModelError(f"no writable folder for the ONNX export of {encoder_id} (tried {beside / CACHE_FOLDER} "
                     "and ~/.cache/prodsim/onnx)", stage="embed")


def export(module, example: tuple, input_names: Sequence[str], output_name: str, target: Path, *,
           quantize: bool) -> Path:
    """``module`` exported to ``target`` (batch and sequence axes dynamic), int8-quantized when asked.
    Written to a temporary file and renamed: concurrent tasks exporting the same model both succeed and
    nobody reads a half-written file."""
    import torch

    if target.is_file():
        return target
    axes = {name: {0: "batch", 1: "length"} if example[i].dim() == 2 else {0: "batch"}
            for i, name in enumerate(input_names)}
    axes[output_name] = {0: "batch"}
    fd, raw = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(module.eval(), example, raw, input_names=list(input_names), output_names=[output_name],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fd, quantized = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
            os.close(fd)
            quantize_dynamic(raw, quantized, weight_type=QuantType.QInt8, per_channel=True)
            os.replace(quantized, raw)
        os.replace(raw, target)
    except Exception as exc:
        raise ModelError(f"could not export the model to ONNX ({target}): {exc}", stage="embed") from exc
    finally:
        if os.path.exists(raw):
            os.remove(raw)
    log.info("exported %s", target)
    return target


class OnnxModel:
    """An ONNX Runtime session on the CPU, called like the torch model it came from."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **arrays):
        return self.session.run(None, {name: arrays[name] for name in self.inputs})[0]


class TracedFeatures:
    """A torch module whose forward is ``fn(model, *inputs)``: what the exporter traces."""

    def __new__(cls, model, fn: Callable):
        import torch

        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *inputs):
                return fn(self.model, *inputs)

        return Features()
