"""The training loops that ``TorchDistributor`` runs in each training process: plain torch, no Spark.

:mod:`prodsim_spark.finetune` makes the data on Spark and hands it to these functions ("make the
data" apart from "run the training", as the embed stage keeps "make the model" apart from "run a
batch"). Each function runs once per process (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` come from
torchrun), trains on its share of every epoch, and rank 0 saves the model folder and returns the
training figures.

* :func:`train_text`: symmetric multiple-negatives ranking loss (InfoNCE) over in-batch negatives
  plus the hard negatives mined from the run's neighbour lists; mean pooling as the text encoder
  does, so the saved folder is a drop-in ``embed.text.model``. Full fine-tuning or LoRA (``peft``,
  merged into the weights before saving).
* :func:`train_image`: supervised contrastive loss over augmented views of grouped photos, training
  the last ``trainable_blocks`` blocks of the backbone and a projection head; the frozen blocks'
  output is computed once per view.

Seeded: the same data, settings and seed give the same model on the same machine and device.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

IMAGE_CONFIG = "config.json"   # in an image model folder: the architecture and head that the weights fit
IMAGE_WEIGHTS = "model.safetensors"
IMAGE_FORMAT = "prodsim-image-encoder"
PREPROCESSING = ("image_size", "crop_pct", "mean", "std")  # embed.image settings a fine-tuned head depends on


def preprocessing(image) -> dict:
    """The embed.image settings that shape the pixels a model sees (see PREPROCESSING)."""
    return {key: getattr(image, key) for key in PREPROCESSING}


# --------------------------------------------------------------------------------------------
# what both loops share


@contextmanager
def _process_group(cuda: bool):
    """(rank, world, device) of this process; a process group when there are several."""
    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank, world, device
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _schedule(optimiser, steps: int, warmup_share: float = 0.1):
    """Linear warm-up over the first ``warmup_share`` of the steps, then linear decay to 0."""
    import torch

    warmup = max(1, int(steps * warmup_share))
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup)))


def _step(optimiser, scheduler, loss) -> float:
    """One optimiser step on ``loss``; returns the loss as a number."""
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    scheduler.step()
    return float(loss.detach())


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX): there, bf16
    autocast makes a text training step about 1.7x faster (measured on this 2-core machine); elsewhere
    bf16 is emulated and slower than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(cuda: bool, settings: dict, *, on_cpu: bool = True):
    """bfloat16 autocast (``mixed_precision``) on a GPU, or (``on_cpu``) on a CPU with native bf16;
    float32 otherwise. The weights and the optimiser stay float32 (autocast only lowers the matrix
    products)."""
    import torch

    on = settings["mixed_precision"] and (cuda or (on_cpu and cpu_has_bf16()))
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=on)


def _epoch_batches(n: int, size: int, rank: int, world: int, seed: int, epoch: int) -> list:
    """This rank's batches of one epoch: a seeded permutation cut into world x size steps, so every
    rank runs the same number of steps (DDP needs them in lockstep); the tail is left to the next epoch's
    shuffle."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(n)
    size = max(2, min(size, n // world))
    steps = n // (world * size)
    return [order[(s * world + rank) * size:(s * world + rank + 1) * size] for s in range(steps)]


def _steps_per_epoch(n: int, size: int, world: int) -> int:
    size = max(2, min(size, n // world))
    return n // (world * size)


def _write_atomically(model_out: str, write) -> None:
    """``write(folder)`` into a fresh folder beside ``model_out``, then swap it in: a crash leaves the
    old model folder (or none), never a half-written one."""
    import shutil
    import tempfile

    target = Path(model_out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    write(fresh)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    fresh.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# text


# Texts per forward pass in CPU training. A batch is padded to its longest text, and on a CPU a padded
# token costs what a real one does: the step's texts go through in chunks of similar length instead
# (Amazon-Google's texts: 27% fewer tokens than one padded batch of 64; a step 2x faster here). The
# vectors are the same; the hidden layers' dropout draws its masks in another order, as another seed
# would. On a GPU one padded batch is faster than several small ones.
CPU_LENGTH_CHUNK = 16


def original_order(chunks: list[list[int]]) -> list[int]:
    """Where each original index sits in the chunks laid end to end (to put the rows back in order)."""
    flat = [i for rows in chunks for i in rows]
    position = [0] * len(flat)
    for at, i in enumerate(flat):
        position[i] = at
    return position


# where model families keep the dropout on their attention weights: BERT, RoBERTa, XLM-R, MPNet, ELECTRA
# (MiniLM and most sentence encoders, multilingual ones included); DistilBERT, BART
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def set_attention_dropout(config, value) -> list[str]:
    """Set the attention dropout of a transformers ``config`` to ``value`` (None: leave the model's own);
    returns the keys it set, none for a family that keeps it under another name."""
    if value is None:
        return []
    keys = [key for key in ATTENTION_DROPOUT_KEYS if hasattr(config, key)]
    for key in keys:
        setattr(config, key, float(value))
    return keys


def _lora(model, settings: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings["lora_rank"], lora_alpha=settings["lora_alpha"], lora_dropout=0.05,
                        target_modules="all-linear")
    return get_peft_model(model, config)


def train_text(records: list[dict], base_folder: str, model_out: str, settings: dict) -> dict:
    """Fine-tune a Hugging Face text encoder on records ``anchor_text, positive_text, anchor_negatives,
    positive_negatives`` (one per labelled pair).

    Loss per batch of B pairs (symmetric InfoNCE at ``1 / temperature`` scale): cross-entropy of each
    anchor against the B positives and the anchors' hard negatives, plus of each positive against the B
    anchors and the positives' hard negatives. Returns the training figures (from rank 0)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from prodsim_spark import encoders

    cuda = torch.cuda.is_available() and settings["device"] != "cpu"
    with _process_group(cuda) as (rank, world, device):
        _seed(settings["seed"])
        if not cuda:
            torch.set_num_threads(max(1, settings["threads"] // world))
        local = Path(base_folder).exists()
        tokenizer = AutoTokenizer.from_pretrained(base_folder, local_files_only=local)
        config = AutoConfig.from_pretrained(base_folder, local_files_only=local)
        dropout_keys = set_attention_dropout(config, settings["attention_dropout"])
        if settings["attention_dropout"] is not None and not dropout_keys and rank == 0:
            print(f"[fine-tune] finetune.text.attention_dropout not applied: {type(config).__name__} has none "
                  f"of {ATTENTION_DROPOUT_KEYS}; the model's own attention dropout is used", flush=True)
        model = AutoModel.from_pretrained(base_folder, config=config, local_files_only=local).to(device)
        if settings["method"] == "lora":
            model = _lora(model, settings)
        model.train()
        trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=settings["learning_rate"], weight_decay=0.01)
        per_epoch = _steps_per_epoch(len(records), settings["batch_size"], world)
        scheduler = _schedule(optimiser, per_epoch * settings["epochs"])
        scale = 1.0 / settings["temperature"]
        autocast = _autocast(cuda, settings)

        chunk = None if cuda else CPU_LENGTH_CHUNK

        def embed(texts: list[str]):
            encoded = tokenizer(texts, truncation=True, max_length=settings["max_tokens"])
            order, parts = encoders.length_chunks([len(ids) for ids in encoded["input_ids"]], chunk), []
            for rows in order:
                batch = tokenizer.pad({k: [v[i] for i in rows] for k, v in encoded.items()},
                                      return_tensors="pt").to(device)
                with autocast:
                    hidden = trained(**batch).last_hidden_state.float()  # pooled in float32, as embedding does
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                parts.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))  # the text encoder's pooling
            pooled = torch.cat(parts)[torch.as_tensor(original_order(order), device=device)]
            return torch.nn.functional.normalize(pooled, dim=1)

        losses, seen, started = [], 0, time.perf_counter()
        for epoch in range(settings["epochs"]):
            total = 0.0
            batches = _epoch_batches(len(records), settings["batch_size"], rank, world, settings["seed"], epoch)
            for rows in batches:
                batch = [records[i] for i in rows]
                # anchor -> its positive among the batch's positives and the anchors' hard negatives;
                # positive -> its anchor among the anchors and the positives' hard negatives
                anchors = embed([r["anchor_text"] for r in batch] + [t for r in batch for t in r["positive_negatives"]])
                positives = embed([r["positive_text"] for r in batch] + [t for r in batch for t in r["anchor_negatives"]])
                target = torch.arange(len(batch), device=device)
                loss = (torch.nn.functional.cross_entropy(scale * anchors[:len(batch)] @ positives.T, target)
                        + torch.nn.functional.cross_entropy(scale * positives[:len(batch)] @ anchors.T, target)) / 2
                total, seen = total + _step(optimiser, scheduler, loss), seen + len(batch)
            losses.append(round(total / max(1, len(batches)), 4))
            if rank == 0:
                print(f"[fine-tune] text epoch {epoch + 1}/{settings['epochs']}: loss {losses[-1]:.4f}, "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
        elapsed = time.perf_counter() - started
        if rank == 0:
            final = model.merge_and_unload() if settings["method"] == "lora" else model

            def write(folder: Path) -> None:
                final.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)

            _write_atomically(model_out, write)
        if world > 1:
            torch.distributed.barrier()
    return {"loss_per_epoch": losses, "train_s": round(elapsed, 2),
            "pairs_per_s": round(seen * world / max(elapsed, 1e-9), 2), "steps": per_epoch * settings["epochs"],
            "processes": world, "device": "cuda" if cuda else "cpu"}


# --------------------------------------------------------------------------------------------
# images


def projected_model(backbone, feature_dim: int, projection_dim: int):
    """The fine-tuned image encoder: backbone features, then a linear projection head."""
    import torch

    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(feature_dim, projection_dim)

        def forward(self, pixels):
            return self.head(self.backbone(pixels))

    return Projected()


def split_backbone(backbone, trainable_blocks: int):
    """(frozen, trained) parts of a timm EfficientNet/MobileNet-style backbone (``blocks`` + head
    convolution), or of any backbone (everything trained) when it has no ``blocks``."""
    import torch

    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "conv_stem"):
        if trainable_blocks:
            return torch.nn.Identity(), backbone
        return backbone, torch.nn.Identity()
    cut = len(blocks) - min(trainable_blocks, len(blocks))
    frozen = torch.nn.Sequential(backbone.conv_stem, backbone.bn1, *blocks[:cut])
    tail = [*blocks[cut:], backbone.conv_head, backbone.bn2, backbone.global_pool]
    if trainable_blocks == 0:  # the head alone: the whole backbone is frozen
        return torch.nn.Sequential(frozen, *tail), torch.nn.Identity()
    return frozen, torch.nn.Sequential(*tail)


def train_image(records: list[dict], image_settings_json: str, model_out: str, settings: dict,
                texts: list[dict] | None = None) -> dict:
    """Metric learning on grouped photos: records ``{"uri", "group"}``; the backbone named by the embed
    image settings (its weights as configured), the last ``trainable_blocks`` blocks and a projection
    head trained with a supervised contrastive loss (every other view of a photo of the same group is a
    positive, every other photo a negative). ``texts`` (``{"vector", "group"}``: the run's text vectors
    of labelled listings), when given: the text bridge (:mod:`prodsim_spark.bridge`) is fitted to the
    trained head's mean vector of each group's views and saved beside it, for text vectors of
    ``settings["text_encoder"]``. Returns the training figures (from rank 0)."""
    import torch
    from safetensors.torch import save_model
    from torchvision import transforms as T

    from prodsim_spark.config import ImageEncoderSettings
    from prodsim_spark.encoders import ImageEncoder, ImageError, read_image

    image = ImageEncoderSettings.model_validate_json(image_settings_json)
    cuda = torch.cuda.is_available() and settings["device"] != "cpu"
    with _process_group(cuda) as (rank, world, device):
        _seed(settings["seed"])
        if not cuda:
            torch.set_num_threads(max(1, settings["threads"] // world))
        # a fine-tuned folder's old head is dropped; training needs the torch model, whatever runtime embeds
        backbone = ImageEncoder(image.model_copy(update={"runtime": "torch"}), "cpu").backbone.float()
        frozen, tail = split_backbone(backbone, settings["trainable_blocks"])
        frozen.to(device).eval()
        normalise = T.Normalize(image.mean, image.std)
        augment = T.Compose([
            T.RandomResizedCrop(image.image_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.3, 0.05), T.ToTensor(), normalise])

        # the frozen part runs once per view: its output is the training data of the trained part
        started = time.perf_counter()
        photos, groups, unreadable = [], [], 0
        for r in records:
            try:
                photos.append(read_image(r["uri"], image))
                groups.append(r["group"])
            except ImageError:
                unreadable += 1
        codes = {g: i for i, g in enumerate(sorted(set(groups)))}
        labels = torch.tensor([codes[g] for g in groups])
        features = []
        with torch.inference_mode():
            for view in range(settings["views"]):
                torch.manual_seed(settings["seed"] * 1000 + view)  # the augmentations' randomness
                out = []
                for start in range(0, len(photos), 64):
                    pixels = torch.stack([augment(p) for p in photos[start:start + 64]]).to(device)
                    out.append(frozen(pixels).cpu())
                features.append(torch.cat(out))
        data = torch.cat(features)
        targets = labels.repeat(settings["views"])
        frozen_s = time.perf_counter() - started
        if rank == 0:
            print(f"[fine-tune] image: {len(photos)} photos x {settings['views']} views through the frozen "
                  f"blocks in {frozen_s:.0f} s", flush=True)

        with torch.inference_mode():
            feature_dim = int(tail(data[:2].to(device)).reshape(2, -1).shape[1])
        head = torch.nn.Linear(feature_dim, settings["projection_dim"]).to(device)
        tail.to(device)
        trained_params = [p for p in tail.parameters()] if settings["trainable_blocks"] else []
        for p in trained_params:
            p.requires_grad_(True)
        groups_params = [{"params": list(head.parameters()), "lr": settings["learning_rate"]}]
        if trained_params:
            groups_params.append({"params": trained_params, "lr": settings["learning_rate"] * 0.1})
        optimiser = torch.optim.AdamW(groups_params, weight_decay=1e-4)
        per_epoch = _steps_per_epoch(len(data), settings["batch_size"], world)
        scheduler = _schedule(optimiser, per_epoch * settings["epochs"])
        model = torch.nn.Sequential(tail, torch.nn.Flatten(), head)
        trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        # float32 on CPU: with the default head alone there is little for bf16 to speed up
        autocast = _autocast(cuda, settings, on_cpu=False)

        losses, seen, started = [], 0, time.perf_counter()
        for epoch in range(settings["epochs"]):
            model.train(bool(trained_params))
            total = 0.0
            batches = _epoch_batches(len(data), settings["batch_size"], rank, world, settings["seed"], epoch)
            for rows in batches:
                rows = torch.as_tensor(rows)
                with autocast:
                    z = trained(data[rows].to(device))
                z = torch.nn.functional.normalize(z.float(), dim=1)
                g = targets[rows].to(device)
                eye = torch.eye(len(rows), dtype=torch.bool, device=device)
                logits = (z @ z.T / settings["temperature"]).masked_fill(eye, -1e9)
                positive = (g[:, None] == g[None, :]) & ~eye
                log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
                per_row = -(log_p * positive).sum(1) / positive.sum(1).clamp(min=1)
                has = positive.any(1)
                if not bool(has.any()):
                    continue
                loss = per_row[has].mean()
                total, seen = total + _step(optimiser, scheduler, loss), seen + len(rows)
            losses.append(round(total / max(1, len(batches)), 4))
            if rank == 0 and ((epoch + 1) % 5 == 0 or epoch + 1 == settings["epochs"]):
                print(f"[fine-tune] image epoch {epoch + 1}/{settings['epochs']}: loss {losses[-1]:.4f}", flush=True)
        elapsed = time.perf_counter() - started
        bridge_meta, bridge_weight = None, None
        if rank == 0 and texts:
            import numpy as np

            from prodsim_spark import bridge

            # each group's image vector: the mean of its views through the trained head (the head's
            # vectors of the augmented views stand for the photos' embeddings)
            model.eval()
            with torch.inference_mode():
                z = torch.cat([model(data[i:i + 512].to(device)).float().cpu() for i in range(0, len(data), 512)])
            means = bridge.prototypes(z.numpy(), targets.numpy())
            by_code = {g: means[i] for g, i in codes.items() if i in means}
            bridge_weight, fit = bridge.fit(np.stack([np.asarray(t["vector"], dtype=np.float32) for t in texts]),
                                            [t["group"] for t in texts], by_code, settings["text_bridge_ridge"])
            bridge_meta = {"file": bridge.BRIDGE_WEIGHTS, "text_encoder": settings["text_encoder"],
                           "text_dim": int(bridge_weight.shape[0] - 1), "ridge": settings["text_bridge_ridge"], **fit}
            print(f"[fine-tune] image: text bridge fitted on {fit['listings']} listings with text in "
                  f"{fit['groups']} groups (mean cosine to their group {fit['fit_cosine']:.3f})", flush=True)
        if rank == 0:
            final = projected_model(backbone.cpu(), feature_dim, settings["projection_dim"])
            final.head.load_state_dict(head.cpu().state_dict())

            def write(folder: Path) -> None:
                save_model(final, str(folder / IMAGE_WEIGHTS))
                if bridge_meta:
                    from safetensors.numpy import save_file
                    save_file({"weight": bridge_weight}, str(folder / bridge_meta["file"]))
                (folder / IMAGE_CONFIG).write_text(json.dumps({
                    "format": IMAGE_FORMAT, "kind": image.kind, "architecture": image.model,
                    "feature_dim": feature_dim, "projection_dim": settings["projection_dim"],
                    "mirror_average": settings["mirror_average"],
                    # the head learned features of photos prepared this way: embed must prepare them alike
                    "preprocessing": preprocessing(image),
                    **({"text_bridge": bridge_meta} if bridge_meta else {})}, indent=2))

            _write_atomically(model_out, write)
        if world > 1:
            torch.distributed.barrier()
    return {"loss_per_epoch": losses, "train_s": round(elapsed + frozen_s, 2), "frozen_features_s": round(frozen_s, 2),
            "photos": len(photos), "unreadable": unreadable, "groups": len(codes),
            "images_per_s": round(seen * world / max(elapsed, 1e-9), 2),
            "steps": per_epoch * settings["epochs"], "processes": world, "device": "cuda" if cuda else "cpu",
            "trainable_parameters": sum(p.numel() for p in head.parameters()) + sum(p.numel() for p in trained_params),
            "text_bridge": bridge_meta}
