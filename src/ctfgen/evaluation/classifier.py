"""The Fashion-MNIST feature network: a small CNN trained by the project, and its training loop.

It plays Inception's part for the bundled setup: its penultimate layer gives the features for
FID and precision/recall, its softmax the Inception-style score and the per-class accuracy, and
a few channels of its last convolution map (8x8, like Inception's `mixed_6/conv` used by sFID)
the spatial features.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ctfgen.checkpoint import DTYPES, PretrainedMixin, is_checkpoint
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.classifier_config import CHECKPOINT_KIND, ClassifierConfig, ClassifierTrainConfig
from ctfgen.files import write_atomic
from ctfgen.validation import check_output


class FMNISTClassifier(PretrainedMixin, nn.Module):
    """[B, 3, 32, 32] images in [-1, 1] (the channels are averaged: Fashion-MNIST is grey)."""

    checkpoint_kind = CHECKPOINT_KIND
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 1
        for c in config.channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c_in * config.pool_grid**2, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """pool: penultimate features [B, hidden] (pre-activation); logits [B, classes]; spatial:
        the first `spatial_channels` of the last conv map, flattened in (h, w, c) order as ADM does."""
        x = images.float().mean(dim=1, keepdim=True)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                spatial = x[:, : self.config.spatial_channels].permute(0, 2, 3, 1).flatten(1)
            x = F.max_pool2d(x, 2)
        pool = self.fc(F.adaptive_avg_pool2d(x, self.config.pool_grid).flatten(1))
        logits = self.head(self.dropout(F.relu(pool)))
        return {"pool": pool, "logits": logits, "spatial": spatial}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)["logits"]

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> FMNISTClassifier:
        if not Path(directory).exists():
            raise CtfgenError(f"no feature classifier at {directory}; train one with `ctfgen eval train-classifier "
                              f"--out {directory}` or pass --classifier DIR")
        return super().from_pretrained(directory, device=device)


# --- training ---------------------------------------------------------------------------------

def augment(images: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations by up to `shift` pixels (the border filled black)."""
    b, _, h, w = images.shape
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    if shift:
        padded = F.pad(images, (shift,) * 4, value=-1.0)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        images = padded[torch.arange(b)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                        rows, cols]
    return images


@torch.no_grad()
def classifier_accuracy(model: FMNISTClassifier, images_fn, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy; `images_fn(index)` returns the model-range images of those indices."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        index = torch.arange(i, min(i + batch_size, len(labels)))
        correct += int((model(images_fn(index)).argmax(1) == labels[index]).sum())
    return correct / len(labels)


def _learning_rate(cfg: ClassifierTrainConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))


def train_classifier(cfg: ClassifierTrainConfig, command: str | None = None) -> dict:
    """Train on the Fashion-MNIST training split, measure test accuracy, save to `cfg.out` (with
    `command`, the command line that made it, in its config)."""
    from ctfgen.data.datasets import FashionMNIST

    check_output(cfg.out, flag="--out", what="a feature classifier", overwrite=True,
                 is_ours=lambda path: is_checkpoint(path, CHECKPOINT_KIND))
    train, test = FashionMNIST("train", data_dir=cfg.data_dir), FashionMNIST("test", data_dir=cfg.data_dir)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = FMNISTClassifier(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    log, tic, step = [], time.perf_counter(), 0
    bar = tqdm(total=total, desc="classifier", unit="step", disable=not cfg.progress or None, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            images = augment(train.images(index), cfg.shift, cfg.flip, generator)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(cfg, step, total)
            loss = F.cross_entropy(model(images), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                log.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 5),
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - tic, 1)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
        accuracy = classifier_accuracy(model, test.images, test.labels)
        log.append({"step": step, "epoch": epoch + 1, "test_accuracy": accuracy,
                    "seconds": round(time.perf_counter() - tic, 1)})
        bar.write(f"epoch {epoch + 1}/{cfg.epochs}: test accuracy {accuracy:.4f}", file=sys.stderr)
    bar.close()
    train_seconds = time.perf_counter() - tic
    # Measure what is shipped: the weights rounded to the saved dtype.
    rounded = {k: v.to(DTYPES[cfg.dtype]).float() if v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)
    accuracy = classifier_accuracy(model, test.images, test.labels)
    train_cfg = asdict(cfg)
    train_cfg.pop("model")
    result = {"test_accuracy": accuracy, "train_seconds": round(train_seconds, 1), "steps": total,
              "parameters": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(cfg.out, dtype=cfg.dtype, extra={"train": train_cfg, "command": command,
                                                            **result})

    def write_log(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in log)

    write_atomic(Path(cfg.out) / "metrics.jsonl", write_log)
    return result | {"out": str(cfg.out)}
