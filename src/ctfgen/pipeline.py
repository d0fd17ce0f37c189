"""CTFPipeline: class ids in, PIL images out, like a diffusers pipeline.

A pipeline directory holds the parts, each a checkpoint directory of its own, and an index
(`pipeline.json`, like diffusers' model_index.json) naming where each part lies:

    pipeline.json                  {"parts": {"tokenizer": "tokenizer", ...}, "class_names": [...]}
    tokenizer/                     VQ model
    coarse_map_k128.safetensors    fine -> coarse map (K clusters)
    stage1/  stage2/               CTF: coarse GPT and refiner
    baseline/                      optional: the plain GPT over fine tokens

Parts that disagree (a map made for another codebook, vocabularies or grids that do not fit) are
refused when the pipeline is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import write_atomic
from .clustering import CoarseMap
from .data import to_uint8
from .errors import CtfgenError
from .models.gpt import GPT
from .models.refiner import Refiner
from .sampling import generate, refine
from .tokenizer.model import VQModel

INDEX_NAME = "pipeline.json"
PARTS = ("tokenizer", "coarse_map", "stage1", "stage2", "baseline")


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    pixels: torch.Tensor  # uint8 [N, 3, H, W]
    previews: list[Image.Image] | None = None  # decoded from stage 1 alone (cluster-mean codewords)
    preview_pixels: torch.Tensor | None = None  # uint8 [N, 3, H, W]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


class CTFPipeline:
    def __init__(self, tokenizer: VQModel, coarse_map: CoarseMap | None = None, stage1: GPT | None = None,
                 stage2: Refiner | None = None, baseline: GPT | None = None, class_names: list[str] | None = None):
        self.tokenizer, self.coarse_map = tokenizer, coarse_map
        self.stage1, self.stage2, self.baseline = stage1, stage2, baseline
        self._check_parts()
        if class_names is not None and len(class_names) != self.num_classes:
            raise CtfgenError(f"{len(class_names)} class names given for {self.num_classes} classes")
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(self.num_classes)]

    # -- consistency ---------------------------------------------------------------------------

    def _check_parts(self) -> None:
        v = self.tokenizer.config.codebook_size
        has_ctf = [p is not None for p in (self.coarse_map, self.stage1, self.stage2)]
        if any(has_ctf) and not all(has_ctf):
            raise CtfgenError("a CTF pipeline needs all of coarse_map, stage1 and stage2")
        if not any(has_ctf) and self.baseline is None:
            raise CtfgenError("the pipeline has neither CTF stages nor a baseline model")
        models = [m for m in (self.stage1, self.stage2, self.baseline) if m is not None]
        if len({(m.config.block_size, m.config.num_classes) for m in models}) != 1:
            raise CtfgenError("the pipeline's models disagree on the grid size or the number of classes")
        if self.coarse_map is not None:
            k = self.coarse_map.k
            self.coarse_map.check_fingerprint(self.tokenizer.fingerprint, v, where="the pipeline's tokenizer")
            if self.stage1.config.vocab_size != k:
                raise CtfgenError(f"stage 1 predicts {self.stage1.config.vocab_size} coarse labels, the map has {k}")
            if (self.stage2.config.coarse_vocab_size, self.stage2.config.vocab_size) != (k, v):
                raise CtfgenError(f"stage 2 maps {self.stage2.config.coarse_vocab_size} -> "
                                  f"{self.stage2.config.vocab_size} tokens; the map and tokenizer need {k} -> {v}")
        if self.baseline is not None and self.baseline.config.vocab_size != v:
            raise CtfgenError(f"the baseline predicts {self.baseline.config.vocab_size} tokens, the tokenizer has {v}")

    @property
    def num_classes(self) -> int:
        return (self.stage1 or self.baseline).config.num_classes

    @property
    def grid(self) -> int:
        return (self.stage1 or self.baseline).config.grid_size

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> CTFPipeline:
        directory = Path(directory)
        index_path = directory / INDEX_NAME
        if not index_path.is_file():
            raise CtfgenError(f"{directory} is not a ctfgen pipeline (no {INDEX_NAME}); pass a directory written by "
                              f"CTFPipeline.save_pretrained or `ctfgen assemble`")
        try:
            index = json.loads(index_path.read_text())
            paths = {name: directory / path for name, path in index["parts"].items() if name in PARTS}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CtfgenError(f"{index_path} is not a valid pipeline index; rewrite it with `ctfgen assemble`") \
                from None
        for name, path in paths.items():
            if not path.exists():
                raise CtfgenError(f"{index_path} names {name} at {path}, which does not exist")
        if "tokenizer" not in paths:
            raise CtfgenError(f"{index_path} names no tokenizer")
        loaders = {"tokenizer": VQModel.from_pretrained, "stage1": GPT.from_pretrained,
                   "stage2": Refiner.from_pretrained, "baseline": GPT.from_pretrained}
        parts = {name: (CoarseMap.load(path) if name == "coarse_map" else loaders[name](path, device=device))
                 for name, path in paths.items()}
        return cls(**parts, class_names=index.get("class_names"))

    def part_paths(self) -> dict[str, str]:
        """Where save_pretrained puts each present part, relative to the pipeline directory."""
        names = {"tokenizer": "tokenizer", "stage1": "stage1", "stage2": "stage2", "baseline": "baseline"}
        if self.coarse_map is not None:
            names["coarse_map"] = f"coarse_map_k{self.coarse_map.k}.safetensors"
        return {name: path for name, path in names.items() if getattr(self, name) is not None}

    def save_pretrained(self, directory, dtype: str | None = "bf16", provenance: dict | None = None) -> Path:
        """Write every part (weights cast to `dtype`; the tokenizer to fp16), then the index, last: a directory
        whose writing was interrupted has no index and is refused. `provenance` (where each part came from) is
        kept in the index as is."""
        directory = Path(directory)
        paths = self.part_paths()
        self.tokenizer.save_pretrained(directory / paths["tokenizer"], dtype="fp16" if dtype else None)
        if self.coarse_map is not None:
            self.coarse_map.save(directory / paths["coarse_map"])
        for name in ("stage1", "stage2", "baseline"):
            if name in paths:
                getattr(self, name).save_pretrained(directory / paths[name], dtype=dtype)
        index = {"parts": paths, "class_names": self.class_names} | ({"provenance": provenance} if provenance else {})
        write_atomic(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
        return directory

    # -- sampling ------------------------------------------------------------------------------

    def compile_decoding(self) -> CTFPipeline:
        """torch.compile the one-token decode step of stage 1 and the baseline (`GPT.compile_decode_step`).
        The first batch pays the compile time, so it pays off over many batches, not for one demo grid."""
        for model in (self.stage1, self.baseline):
            if model is not None:
                model.compile_decode_step()
        return self

    def _check_request(self, labels: torch.Tensor, mode: str, cfg_scale: float, top_k: int, top_k2: int) -> None:
        if mode not in ("ctf", "baseline"):
            raise CtfgenError(f"unknown mode {mode!r}; use 'ctf' or 'baseline'")
        if mode == "baseline" and self.baseline is None:
            raise CtfgenError("this pipeline has no baseline model")
        if mode == "ctf" and self.stage1 is None:
            raise CtfgenError("this pipeline has no CTF stages")
        if len(labels) == 0:
            raise CtfgenError("no class labels given")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise CtfgenError(f"class id {int(bad[0])} is out of range; "
                              f"this model has classes 0..{self.num_classes - 1}")
        if cfg_scale < 1.0:
            raise CtfgenError(f"cfg_scale must be >= 1 (1 disables guidance), got {cfg_scale}")
        vocab = (self.stage1 if mode == "ctf" else self.baseline).config.vocab_size
        if not 0 <= top_k <= vocab:
            raise CtfgenError(f"top_k must be between 0 (off) and the vocabulary size {vocab}, got {top_k}")
        if not 0 <= top_k2 <= self.tokenizer.config.codebook_size:
            raise CtfgenError(f"top_k2 must be between 0 (off) and {self.tokenizer.config.codebook_size}, got {top_k2}")

    def cluster_mean_latents(self, coarse: torch.Tensor) -> torch.Tensor:
        """Coarse grid [B, h, w] -> latents [B, D, h, w]: each label's normalised mean codeword."""
        means = F.normalize(self.coarse_map.centroids(self.tokenizer.codebook), dim=-1).to(coarse.device)
        return means[coarse].permute(0, 3, 1, 2)

    @torch.no_grad()
    def sample_tokens(self, labels: torch.Tensor, *, mode: str = "ctf", cfg_scale: float = 2.0,
                      cfg_interval: int = -1, tau1: float = 1.0, tau2: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, top_k2: int = 0, cfg_scale2: float = 1.0, restrict: bool = True,
                      generator: torch.Generator | None = None):
        """Token grids for one batch: (fine [B, h, w], coarse [B, h, w] or None)."""
        g = self.grid
        if mode == "baseline":
            fine = generate(self.baseline, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                            temperature=tau1, top_k=top_k, top_p=top_p, generator=generator)
            return fine.view(-1, g, g), None
        coarse = generate(self.stage1, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=tau1,
                          top_k=top_k, top_p=top_p, generator=generator)
        fine = refine(self.stage2, coarse, labels, self.coarse_map.coarse_of_fine, temperature=tau2, top_k=top_k2,
                      cfg_scale=cfg_scale2, restrict=restrict, generator=generator)
        return fine.view(-1, g, g), coarse.view(-1, g, g)

    def sample_batches(self, class_labels, *, batch_size: int = 64, seed: int = 0, progress: bool = False,
                       preview: bool = False, **sampling) -> PipelineOutput:
        """Many images: `__call__` on consecutive batches of `batch_size`, batch i seeded with seed + i, so
        that a batch's images do not depend on how many batches come before it; with a progress bar."""
        from tqdm import tqdm

        labels = [int(c) for c in torch.as_tensor(class_labels).flatten()]
        starts = range(0, len(labels), batch_size)
        outputs = [self(labels[start:start + batch_size], seed=seed + i, batch_size=batch_size, preview=preview,
                        **sampling)
                   for i, start in enumerate(tqdm(starts, desc=f"sample[{sampling.get('mode', 'ctf')}]",
                                                  unit="batch", disable=None if progress else True))]
        pixels = torch.cat([out.pixels for out in outputs])
        previews = torch.cat([out.preview_pixels for out in outputs]) if preview else None
        return PipelineOutput([image for out in outputs for image in out.images], pixels,
                              [image for out in outputs for image in out.previews] if preview else None, previews)

    @torch.no_grad()
    def __call__(self, class_labels, *, mode: str = "ctf", cfg_scale: float = 2.0, cfg_interval: int = -1,
                 tau1: float = 1.0, tau2: float = 1.0, top_k: int = 0, top_p: float = 1.0, top_k2: int = 0,
                 cfg_scale2: float = 1.0, restrict: bool = True, seed: int | None = 0, batch_size: int = 64,
                 preview: bool = False) -> PipelineOutput:
        """Images for the given class ids. The same seed gives the same images on the same device."""
        device = next(self.tokenizer.parameters()).device
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten().to(device)
        self._check_request(labels, mode, cfg_scale, top_k, top_k2)
        if preview and mode != "ctf":
            raise CtfgenError("preview needs the CTF stages (mode='ctf')")
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        pixels, previews = [], []
        for batch in labels.split(batch_size):
            fine, coarse = self.sample_tokens(batch, mode=mode, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                              tau1=tau1, tau2=tau2, top_k=top_k, top_p=top_p, top_k2=top_k2,
                                              cfg_scale2=cfg_scale2, restrict=restrict, generator=generator)
            pixels.append(to_uint8(self.tokenizer.decode(fine)).cpu())
            if preview:
                previews.append(to_uint8(self.tokenizer.decode_latents(self.cluster_mean_latents(coarse))).cpu())
        pixels = torch.cat(pixels)
        previews = torch.cat(previews) if preview else None
        return PipelineOutput(to_pil(pixels), pixels, to_pil(previews) if preview else None, previews)
