"""The redundancy study (the paper's Figure 1b): swap every token for another member of its
cluster, decode, and measure how far the image moves from the plain reconstruction."""

from __future__ import annotations

import torch

from ctfgen.clustering import CoarseMap, cluster_codebook
from ctfgen.data.datasets import FashionMNIST, collate_images, crop_original, to_uint8
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.image_metrics import psnr_per_image, ssim_per_image
from ctfgen.tokenizer.model import VQModel


def swap_within_clusters(codes: torch.Tensor, coarse_map: CoarseMap, generator: torch.Generator) -> torch.Tensor:
    """Replace every fine token by a uniformly drawn *other* member of its cluster (a token alone
    in its cluster stays)."""
    coarse = coarse_map.coarse_of_fine
    order = torch.argsort(coarse, stable=True)  # fine tokens grouped by cluster
    sizes = coarse_map.cluster_sizes()
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_cluster = torch.empty_like(order)
    rank_in_cluster[order] = torch.arange(len(order)) - starts[coarse[order]]

    flat = codes.flatten().cpu()
    cluster = coarse[flat]
    size = sizes[cluster]
    draw = (torch.rand(flat.shape, generator=generator) * (size - 1).clamp_min(1)).long()
    draw = draw + (draw >= rank_in_cluster[flat]).long()  # skip the token itself
    swapped = torch.where(size > 1, order[(starts[cluster] + draw).clamp_max(len(order) - 1)], flat)
    return swapped.view_as(codes).to(codes.device)


@torch.no_grad()
def redundancy_study(tokenizer: VQModel, coarse_map: CoarseMap, dataset, n: int, *, seed: int = 0,
                     batch_size: int = 250, grid_rows: int = 8):
    """PSNR / SSIM of cluster-swapped decodes against the plain reconstruction, for the given map
    and for a random map with the same K. Returns (figures, uint8 grid images [rows*4, 3, H, W])."""
    if n < 1:
        raise CtfgenError(f"--n must be at least 1, got {n}")
    coarse_map.check_fingerprint(tokenizer.fingerprint, tokenizer.config.codebook_size)
    random_map = cluster_codebook(tokenizer.codebook_weights, coarse_map.k, method="random", seed=seed)
    maps = {"kmeans" if coarse_map.method == "kmeans" else coarse_map.method: coarse_map, "random": random_map}
    device = next(tokenizer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    scores = {name: {"psnr": [], "ssim": []} for name in maps}
    grid, skipped = None, 0
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        index = list(range(start, min(n, start + batch_size)))
        if isinstance(dataset, FashionMNIST):
            images = dataset.images(index)
        else:  # an unreadable image is None with skip_bad (warned about), else a CtfgenError
            images, _, dropped = collate_images([dataset[i] for i in index])
            skipped += dropped
            if not len(images):
                continue
        images = images.to(device)
        codes = tokenizer.encode(images)
        plain = to_uint8(tokenizer.decode(codes))
        row = [to_uint8(images), plain]
        for name, m in maps.items():
            swapped = to_uint8(tokenizer.decode(swap_within_clusters(codes, m, generator)))
            a, b = crop_original(plain, dataset), crop_original(swapped, dataset)
            scores[name]["psnr"].append(psnr_per_image(a, b).cpu())
            scores[name]["ssim"].append(ssim_per_image(a, b).cpu())
            row.append(swapped)
        if grid is None:
            grid = torch.stack([r[:grid_rows].cpu() for r in row], dim=1).flatten(0, 1)
    if grid is None:
        raise CtfgenError(f"none of the {n} images could be read; check the --data folder")
    figures = {"n_images": n - skipped, "n_skipped": skipped, "k": coarse_map.k,
               "codebook_size": coarse_map.vocab_size, "seed": seed}
    for name, s in scores.items():
        figures[f"{name}_psnr"] = float(torch.cat(s["psnr"]).mean())
        figures[f"{name}_ssim"] = float(torch.cat(s["ssim"]).mean())
    figures["psnr_gap_db"] = figures[f"{next(iter(maps))}_psnr"] - figures["random_psnr"]
    return figures, grid
