"""Tokenizer quality on a dataset split: PSNR of reconstructions and codebook usage."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctfgen.data.datasets import collate_images, crop_original, to_uint8
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.image_metrics import psnr_per_image
from ctfgen.tokenizer.model import VQModel


@torch.no_grad()
def evaluate_tokenizer(model: VQModel, dataset, *, batch_size: int = 256, limit: int | None = None,
                       num_workers: int = 0, progress: bool = True) -> dict:
    """PSNR (dB, mean over images, on the original region, uint8 pixels) and codebook usage."""
    if limit is not None and limit < 1:
        raise CtfgenError(f"--limit must be at least 1 (leave it out for every image), got {limit}")
    if batch_size < 1:
        raise CtfgenError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    subset = dataset if limit is None else torch.utils.data.Subset(dataset, range(min(len(dataset), limit)))
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate_images, num_workers=num_workers)
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool, device=device)
    psnrs, n_skipped = [], 0
    for images, _, skipped in tqdm(loader, desc="eval", unit="batch", disable=None if progress else True, leave=False):
        n_skipped += skipped
        if len(images) == 0:
            continue
        images = images.to(device)
        codes = model.encode(images)
        used[codes.flatten()] = True
        recon = model.decode(codes)
        psnrs.append(psnr_per_image(to_uint8(crop_original(images, dataset)),
                                    to_uint8(crop_original(recon, dataset))).cpu())
    if not psnrs:
        raise CtfgenError(f"no readable images to evaluate ({n_skipped} skipped as unreadable)")
    psnr = torch.cat(psnrs)
    return {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()), "codebook_usage": float(used.float().mean()),
            "codes_used": int(used.sum()), "codebook_size": model.config.codebook_size,
            "n_images": len(psnr), "n_skipped": n_skipped}


@torch.no_grad()
def reconstruction_pairs(model: VQModel, dataset, n: int) -> torch.Tensor:
    """uint8 [2n, 3, H, W]: originals interleaved with their reconstructions."""
    if n < 1:
        raise CtfgenError(f"--n must be at least 1, got {n}")
    device = next(model.parameters()).device
    images, _, _ = collate_images([dataset[i] for i in range(min(n, len(dataset)))])
    images = images.to(device)
    recon = model.decode(model.encode(images))
    return torch.stack([to_uint8(images), to_uint8(recon)], dim=1).flatten(0, 1).cpu()
