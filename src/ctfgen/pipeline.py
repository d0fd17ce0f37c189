"""CTFPipeline: a sampling request in, images and their class labels out, like a diffusers pipeline.

Calling the pipeline (or its `sample` with a `SamplingRequest`) is the one way to sample; the CLI, the web page,
bench and evaluation all go through it. A request is checked whole before anything runs, then sampled in batches
(`sampling/batched.py`) under one seeding rule: image i of a request draws its random numbers from a generator of
its own, seeded from (seed, i), so the batch size and the rest of the request do not change it.

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
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ctfgen.backends.decoding import compile_decoding, decoding_compiled
from ctfgen.clustering import CoarseMap
from ctfgen.data.datasets import to_model_range, to_uint8
from ctfgen.errors import CtfgenError
from ctfgen.files import write_atomic
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner
from ctfgen.sampling.batched import sample_request, sample_variations
from ctfgen.sampling.decode import generate, image_seeds, request_seed
from ctfgen.sampling.params import DEFAULT_BATCH_SIZE, STAGE1_DEFAULTS, STAGE2_DEFAULTS, SamplingParams, whole_number
from ctfgen.sampling.refine import refine
from ctfgen.sampling.request import (
    PipelineOutput,
    RunOptions,
    SamplingRequest,
    check_coarse,
    check_stage2,
    check_stage2_against,
    class_ids,
)
from ctfgen.tokenizer.model import VQModel

INDEX_NAME = "pipeline.json"
PARTS = ("tokenizer", "coarse_map", "stage1", "stage2", "baseline")


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

    @property
    def image_size(self) -> int:
        """The side of the images, in pixels (the tokenizer's grid of tokens, upsampled)."""
        return self.grid * self.tokenizer.config.downsample

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
            if not path.resolve().is_relative_to(directory.resolve()):  # a pipeline is one folder: no ../ escapes
                raise CtfgenError(f"{index_path} names {name} at {path}, outside the pipeline's folder; keep every "
                                  f"part inside it (rewrite the index with `ctfgen assemble`)")
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

    def save_pretrained(self, directory, dtype: str | None = None, provenance: dict | None = None) -> Path:
        """Write every part, then the index, last (an earlier index goes first): a directory whose writing failed
        has no index and is refused, and one this call made is removed. The weights are saved as they are (see
        `PretrainedMixin.save_pretrained`), so loading gives the same pipeline; `dtype` ("fp32", "fp16", "bf16")
        casts the transformers to it and the tokenizer to fp16 (to fp32 with "fp32"), and a cast that rounds
        warns. `provenance` (where each part came from) is kept in the index as is."""
        directory, paths = Path(directory), self.part_paths()
        made = not directory.exists()
        try:
            if (directory / INDEX_NAME).is_file():
                (directory / INDEX_NAME).unlink()
            self.tokenizer.save_pretrained(directory / paths["tokenizer"], dtype=dtype and (
                "fp32" if dtype == "fp32" else "fp16"))
            if self.coarse_map is not None:
                self.coarse_map.save(directory / paths["coarse_map"])
            for name in ("stage1", "stage2", "baseline"):
                if name in paths:
                    getattr(self, name).save_pretrained(directory / paths[name], dtype=dtype)
            index = {"parts": paths, "class_names": self.class_names} | (
                {"provenance": provenance} if provenance else {})
            write_atomic(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
        except BaseException:
            if made:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory

    # -- the request ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def class_ids(self, classes) -> list[int]:
        """Class ids from one class or a sequence of them, each an id or a name from `class_names`."""
        return class_ids(classes, self.class_names)

    @contextmanager
    def _inference(self):
        """Eval mode (no class dropout, no dropout) while a request runs; each module's own mode after."""
        modules = [m for part in (self.tokenizer, self.stage1, self.stage2, self.baseline) if part is not None
                   for m in part.modules()]
        modes = [m.training for m in modules]
        for m in modules:
            m.training = False
        try:
            yield
        finally:
            for m, training in zip(modules, modes):
                m.training = training

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, classes, *, per_class: int = 1, mode: str = "ctf", sampling: SamplingParams = STAGE1_DEFAULTS,
                 stage2_sampling: SamplingParams = STAGE2_DEFAULTS, restrict: bool = True,
                 seed: int | torch.Generator | None = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                 output_type: str = "pil", preview: bool = False, callback=None, callback_steps: int = 1,
                 progress: bool = False) -> PipelineOutput:
        """Images of the given classes (ids or names; `per_class` images of each, class after class): the
        `SamplingRequest` of these arguments, sampled by `sample`.

        mode: "ctf" (stage 1, stage 2, decode) or "baseline" (the plain GPT over fine tokens). `sampling`
        is stage 1's (or the baseline's) settings, `stage2_sampling` stage 2's; `restrict=False` lets
        stage 2 leave the cluster (an ablation). `seed`: a whole number 0 .. 2**32 - 1, a torch.Generator (one draw
        of it seeds the request), None (a draw of torch's global generator), or one (seed, index) pair per image:
        image `index` of the request with that seed, whatever else is in this call (how a server merges the
        requests of several users into one call). `preview`: also the images decoded from
        stage 1 alone. `callback(first, step, tokens)` runs every `callback_steps` tokens of the
        autoregressive stage and after its last, with the tokens so far [b, step] of the batch whose first
        image is image `first` of the request. `progress`: a progress bar over the batches.

        The whole request is checked before anything runs. Seeding: image i draws its numbers from its
        own generator seeded from (seed, i), so neither the batch size nor the other images change them.
        The logits can still differ in the last bits between batch shapes (matmul kernels block them
        differently), which flips a token where its number falls on the edge between two tokens: in the
        tests over 99% of tokens agree between batch sizes 1 and 7 in float32, all in float64. The same
        request with the same batch size on the same device gives the same images."""
        drawn = seed is None or isinstance(seed, torch.Generator)
        request = SamplingRequest(classes, per_class, mode, sampling, stage2_sampling, restrict, 0 if drawn else seed)
        options = RunOptions(batch_size, output_type, preview, callback, callback_steps, progress)
        request = request.check(self, preview)
        if drawn:  # last: a generator is drawn from only for a request that runs
            request = replace(request, seed=request_seed(seed))
        with self._inference():
            return sample_request(self, request, options)

    @torch.no_grad()
    def sample(self, request: SamplingRequest, *, batch_size: int = DEFAULT_BATCH_SIZE, output_type: str = "pil",
               preview: bool = False, callback=None, callback_steps: int = 1,
               progress: bool = False) -> PipelineOutput:
        """The images of `request`, run as the pipeline call's keyword arguments of the same names say."""
        options = RunOptions(batch_size, output_type, preview, callback, callback_steps, progress)
        request = request.check(self, preview)
        with self._inference():
            return sample_request(self, request, options)

    @torch.no_grad()
    def variations(self, coarse, classes, *, n: int = 1, stage2_sampling: SamplingParams = STAGE2_DEFAULTS,
                   restrict: bool = True, seed: int | torch.Generator | None = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE, output_type: str = "pil",
                   progress: bool = False) -> PipelineOutput:
        """Re-roll the details: `n` new fine grids for each coarse grid [N, h, w] (e.g. `out.coarse`; from fine
        tokens, `pipe.coarse_map.coarse_of_fine[tokens]`) with its class, by stage 2 alone. Image j of the
        result is variation j % n of grid j // n, and draws its stage-2 numbers as image j of a request
        does, so with n = 1 and the request's seed and batch size it gives that request's images again."""
        if self.stage2 is None:
            raise CtfgenError("variations re-run stage 2; this pipeline has no CTF stages")
        coarse = check_coarse(coarse, self.grid, self.coarse_map.k)
        labels = torch.tensor(self.class_ids(classes))
        if len(labels) != len(coarse):
            raise CtfgenError(f"{len(coarse)} coarse grids but {len(labels)} classes; give one class per grid")
        n = whole_number(n, "n", minimum=1)
        coarse, labels = coarse.repeat_interleave(n, 0), labels.repeat_interleave(n)
        check_stage2(stage2_sampling)
        check_stage2_against(stage2_sampling, self)
        options = RunOptions(batch_size, output_type, progress=progress)
        seeds = image_seeds(seed, len(labels))
        with self._inference():
            return sample_variations(self, coarse, labels, seeds, stage2_sampling, restrict, options)

    # -- the stage steps of a request: on tensors of the pipeline's device, unchecked ---------------

    @torch.no_grad()
    def stage1_tokens(self, labels: torch.Tensor, sampling: SamplingParams = STAGE1_DEFAULTS,
                      uniforms: torch.Tensor | None = None, callback=None, callback_steps: int = 1) -> torch.Tensor:
        """Stage 1: coarse grids [B, h, w] for class ids [B], token t of row b picked by uniforms[b, t]."""
        return self._grids(self.stage1, labels, sampling, uniforms, callback, callback_steps)

    @torch.no_grad()
    def stage2_tokens(self, coarse: torch.Tensor, labels: torch.Tensor, sampling: SamplingParams = STAGE2_DEFAULTS,
                      uniforms: torch.Tensor | None = None, restrict: bool = True) -> torch.Tensor:
        """Stage 2: fine grids [B, h, w] for coarse grids [B, h, w], in sampling.steps passes; pass s picks the
        token at position t by uniforms[b, s, t] ([B, T] for one pass)."""
        fine = refine(self.stage2, coarse.flatten(1), labels, self.coarse_map.coarse_of_fine, sampling,
                      steps=sampling.steps, restrict=restrict, uniforms=uniforms)
        return fine.view_as(coarse)

    @torch.no_grad()
    def baseline_tokens(self, labels: torch.Tensor, sampling: SamplingParams = STAGE1_DEFAULTS,
                        uniforms: torch.Tensor | None = None, callback=None, callback_steps: int = 1) -> torch.Tensor:
        """The baseline: fine grids [B, h, w] straight from the plain GPT."""
        return self._grids(self.baseline, labels, sampling, uniforms, callback, callback_steps)

    def _grids(self, model, labels, sampling, uniforms, callback, callback_steps) -> torch.Tensor:
        """An autoregressive stage's tokens as square grids [B, h, w]."""
        return generate(model, labels, sampling, uniforms=uniforms, callback=callback,
                        callback_steps=callback_steps).view(-1, self.grid, self.grid)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [B, 3, H, W] -> fine grids [B, h, w] on the CPU: the tokens of given images, whose coarse
        labels (`coarse_map.coarse_of_fine[tokens]`) `variations` can re-roll."""
        size = self.image_size
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1:] != (3, size, size):
            raise CtfgenError(f"images to encode must be uint8 [B, 3, {size}, {size}], got {pixels.dtype} "
                              f"{list(pixels.shape)}")
        with self._inference():
            return self.tokenizer.encode(to_model_range(pixels).to(self.device)).cpu()

    @torch.no_grad()
    def decode(self, fine: torch.Tensor) -> torch.Tensor:
        """Fine grids [B, h, w] -> uint8 pixels [B, 3, H, W] on the CPU."""
        return to_uint8(self.tokenizer.decode(fine)).cpu()

    @torch.no_grad()
    def decode_preview(self, coarse: torch.Tensor) -> torch.Tensor:
        """Coarse grids [B, h, w] -> uint8 pixels [B, 3, H, W]: every label decoded as its cluster's mean codeword."""
        return to_uint8(self.tokenizer.decode_latents(self.cluster_mean_latents(coarse))).cpu()

    def cluster_mean_latents(self, coarse: torch.Tensor) -> torch.Tensor:
        """Coarse grid [B, h, w] -> latents [B, D, h, w] in the decoder's dtype: each label's normalised mean
        codeword, computed in float64 from the stored codebook (a float64 decoder then draws the same preview on
        every CPU kind)."""
        means = F.normalize(self.coarse_map.centroids(self.tokenizer.codebook_weights), dim=-1)
        return means.to(coarse.device, self.tokenizer.post_quant_conv.weight.dtype)[coarse].permute(0, 3, 1, 2)

    def compile_decoding(self) -> CTFPipeline:
        """torch.compile the one-token decode step of stage 1 and the baseline (`ctfgen.backends.decoding`).
        The first batch pays the compile time, so it pays off over many batches, not for one demo grid."""
        for model in (self.stage1, self.baseline):
            if model is not None:
                compile_decoding(model)
        return self

    @property
    def decoding_compiled(self) -> bool:
        return any(decoding_compiled(m) for m in (self.stage1, self.baseline) if m is not None)

    def copy(self, dtype: torch.dtype | None = None) -> CTFPipeline:
        """A pipeline over new copies of the transformers (cast to `dtype`, eager, in eval mode), sharing the
        tokenizer and the coarse map: for callers that cast or compile without changing this pipeline."""
        def clone(model):
            if model is None:
                return None
            with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG be
                twin = type(model)(model.config)
            twin.load_state_dict(model.state_dict())
            return twin.to(device=self.device, dtype=dtype or next(model.parameters()).dtype).eval()

        return CTFPipeline(self.tokenizer, self.coarse_map, clone(self.stage1), clone(self.stage2),
                           clone(self.baseline), class_names=self.class_names)
