"""The steps of a fit, in order, each with the inputs its fingerprint covers and the library call that does it.

    data       the checked, split images laid out under DIR/data (image folders)
    tokenizer  DIR/runs/tokenizer (trained; --tokenizer: the given one, reused)
    map        DIR/coarse_map.safetensors: k-means of the codewords
    codes      DIR/codes/{train,val}: the token grids of both splits
    stage1, stage2, baseline
               DIR/runs/<name>: the transformers (baseline unless --no-baseline)
    pipeline   DIR/pipeline: what `ctfgen sample`, `serve` and CTFPipeline.from_pretrained take
    report     DIR/report.md, report.json and DIR/report/ (figures)

The heavy steps (training, extraction) run on every torchrun process, data-parallel; the others on the main one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctfgen.errors import check_finished
from ctfgen.fit.data import FitData, write_layout
from ctfgen.fit.presets import FitConfig
from ctfgen.fit.state import fingerprint
from ctfgen.training.distributed import Runtime

LOG_EVERY = 10  # steps between the training-loss lines of a run's metrics.jsonl
TRANSFORMER_OPTIONS = ("steps", "batch_size", "lr", "warmup_steps", "lr_schedule", "dropout", "eval_every",
                       "eval_items", "seed", "precision", "compile", "flip")
TOKENIZER_OPTIONS = ("tokenizer_model", "codebook_size", "tokenizer_steps", "tokenizer_batch_size", "tokenizer_lr",
                     "tokenizer_warmup_steps", "tokenizer_restart_every", "image_size", "seed", "tokenizer_precision")


@dataclass
class Context:
    """What the steps share: the fit's folder, choices and data, this process, and each step's result."""

    out: Path
    config: FitConfig
    data: FitData
    runtime: Runtime
    progress: bool
    command: str
    preset: str
    reuse_tokenizer: str | None = None
    inception_weights: str | None = None
    layout: dict | None = None  # the images to lay out, when the data step has to run
    results: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # each finished step's time, this run's or an earlier one's
    resumed: set = field(default_factory=set)  # the steps whose time is that of their last, resumed, part

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.reuse_tokenizer) if self.reuse_tokenizer else self.out / "runs" / "tokenizer" / "checkpoint"

    @property
    def map_path(self) -> Path:
        return self.out / "coarse_map.safetensors"


@dataclass
class Step:
    name: str
    what: str  # said when it starts
    options: dict  # its own choices
    reads: list[str]  # the steps whose outputs it reads
    run: Callable[[Context, bool], dict]  # (context, resume) -> a JSON-ready result
    output: Path | None  # what a finished step leaves (None: nothing on disk)
    heavy: bool = False
    run_dir: Path | None = None  # a training run, resumed from its checkpoint
    fingerprint: str = ""
    inputs: dict = field(default_factory=dict)


def plan(ctx: Context, data_inputs: dict) -> list[Step]:
    """The steps of this fit in order, each with its fingerprint (over its options and the steps it reads)."""
    c, out = ctx.config, ctx.out
    options = asdict(c)
    pick = {name: options[name] for name in TRANSFORMER_OPTIONS}
    if ctx.reuse_tokenizer:
        from ctfgen.evaluation.features import file_digest

        tok_options = {"reuse": str(Path(ctx.reuse_tokenizer).resolve()),
                       "weights": file_digest(ctx.tokenizer_dir / "model.safetensors")}
        tokenizer = Step("tokenizer", f"reusing {ctx.reuse_tokenizer}", tok_options, ["data"], _reuse_tokenizer,
                         ctx.tokenizer_dir)
    else:
        tokenizer = Step("tokenizer", f"training {c.tokenizer_model} ({c.codebook_size} codewords) for "
                                      f"{c.tokenizer_steps} steps of {c.tokenizer_batch_size} images",
                         {name: options[name] for name in TOKENIZER_OPTIONS}, ["data"], _train_tokenizer,
                         ctx.tokenizer_dir, heavy=True, run_dir=out / "runs" / "tokenizer")
    stages = [("stage1", c.stage1_model, ["codes", "map"]), ("stage2", c.stage2_model, ["codes", "map"])]
    if c.baseline:
        stages.append(("baseline", c.baseline_model, ["codes"]))
    steps = [
        Step("data", f"laying out {ctx.data.n_train} training and {ctx.data.n_val} held-out images", data_inputs, [],
             _lay_out, None if ctx.data.source == "fmnist" else Path(ctx.data.source)),
        tokenizer,
        Step("map", f"k-means of the {c.codebook_size} codewords into K = {c.k} clusters", {"k": c.k, "seed": c.seed},
             ["tokenizer"], _cluster, ctx.map_path),
        Step("codes", "encoding the training and held-out images to token grids",
             {"image_size": c.image_size, "flip": c.flip}, ["data", "tokenizer"], _extract, out / "codes", heavy=True),
        *[Step(name, f"training {model} for {c.steps} steps of {c.batch_size} grids", {"model": model, **pick}, reads,
               _stage_runner(name, model), out / "runs" / name / "checkpoint", heavy=True, run_dir=out / "runs" / name)
          for name, model, reads in stages],
        Step("pipeline", f"assembling {out / 'pipeline'}", {"dtype": c.pipeline_dtype, "classes": ctx.data.classes},
             ["tokenizer", "map", *(name for name, _, _ in stages)], _assemble, out / "pipeline"),
        Step("report", "evaluating: tokenizer PSNR, held-out losses, sample grids, FID",
             {"eval_per_class": c.eval_per_class, "grid_per_class": c.grid_per_class, "seed": c.seed,
              "inception_weights": ctx.inception_weights}, ["data", "pipeline"], _report, out / "report.md"),
    ]
    fingerprints = {}
    for step in steps:
        step.inputs = {"options": step.options, "reads": {name: fingerprints[name] for name in step.reads}}
        step.fingerprint = fingerprints[step.name] = step_fingerprint(step.name, step.inputs)
    return steps


def step_fingerprint(name: str, inputs: dict) -> str:
    return fingerprint({"step": name, **inputs})


# --- what each step does ---------------------------------------------------------------------------------------------

def _lay_out(ctx: Context, resume: bool) -> dict:
    if ctx.data.source != "fmnist":
        write_layout(ctx.data, ctx.layout)
    return ctx.data.to_dict()


def _reuse_tokenizer(ctx: Context, resume: bool) -> dict:
    from ctfgen.tokenizer.model import VQModel

    tokenizer = VQModel.from_pretrained(ctx.tokenizer_dir)
    return {"checkpoint": str(ctx.tokenizer_dir), "codebook_fingerprint": tokenizer.fingerprint}


def _train_tokenizer(ctx: Context, resume: bool) -> dict:
    from ctfgen.tokenizer.train import TokenizerTrainConfig, train_in

    c = ctx.config
    cfg = TokenizerTrainConfig(out=str(ctx.out / "runs" / "tokenizer"), model=c.tokenizer_model, data=ctx.data.source,
                               image_size=c.image_size, codebook_size=c.codebook_size, steps=c.tokenizer_steps,
                               batch_size=c.tokenizer_batch_size, lr=c.tokenizer_lr,
                               warmup_steps=c.tokenizer_warmup_steps, restart_every=c.tokenizer_restart_every,
                               ckpt_every=c.tokenizer_ckpt_every, log_every=LOG_EVERY, seed=c.seed,
                               precision=c.tokenizer_precision, resume=resume, progress=ctx.progress)
    return _finished_run(cfg, ctx, train_in, ("loss", "rec_mse", "psnr_batch", "codebook_usage_window"))


def _stage_runner(stage: str, model: str) -> Callable[[Context, bool], dict]:
    def run(ctx: Context, resume: bool) -> dict:
        from ctfgen.training.train import TrainConfig, train_in

        c = ctx.config
        cfg = TrainConfig(stage=stage, codes=str(ctx.out / "codes" / "train"), out=str(ctx.out / "runs" / stage),
                          model=model, map=None if stage == "baseline" else str(ctx.map_path),
                          eval_codes=str(ctx.out / "codes" / "val"), steps=c.steps, batch_size=c.batch_size, lr=c.lr,
                          warmup_steps=c.warmup_steps, lr_schedule=c.lr_schedule, dropout=c.dropout,
                          eval_every=c.eval_every, eval_items=c.eval_items, ckpt_every=c.ckpt_every, seed=c.seed,
                          precision=c.precision, compile=c.compile, log_every=LOG_EVERY, resume=resume,
                          progress=ctx.progress)
        return _finished_run(cfg, ctx, train_in, ("loss", "eval_loss", "eval_acc"))

    return run


def _finished_run(cfg, ctx: Context, train_in, keys: tuple) -> dict:
    """Train `cfg` (resumed or not) on this process, unless its checkpoint already reached the last step (a run
    killed after it finished and before fit.json said so); its last metrics either way."""
    import json

    from ctfgen.checkpoint import checkpoint_step

    run_dir = Path(cfg.out)
    if not (cfg.resume and checkpoint_step(run_dir / "checkpoint") >= cfg.steps):
        train_in(cfg, ctx.runtime)
    # a training stopped by SIGTERM/SIGINT returns after its checkpoint: the step is not done, and the fit stops
    check_finished(f"the {run_dir.name} training", checkpoint_step(run_dir / "checkpoint"), cfg.steps,
                   "run the same `ctfgen fit` again to resume it")
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("step") == cfg.steps:
            last |= entry
    return {"checkpoint": str(run_dir / "checkpoint"), "steps": cfg.steps, **{k: last[k] for k in keys if k in last}}


def _cluster(ctx: Context, resume: bool) -> dict:
    from ctfgen.clustering import cluster_codebook
    from ctfgen.tokenizer.model import VQModel

    codebook = VQModel.from_pretrained(ctx.tokenizer_dir).codebook_weights
    coarse_map = cluster_codebook(codebook, ctx.config.k, seed=ctx.config.seed)
    coarse_map.save(ctx.map_path)
    return {"k": coarse_map.k, "inertia": coarse_map.inertia, "cluster_sizes": coarse_map.size_stats()}


def _extract(ctx: Context, resume: bool) -> dict:
    from ctfgen.data.codes import extract_codes
    from ctfgen.tokenizer.model import VQModel

    tokenizer = VQModel.from_pretrained(ctx.tokenizer_dir, device=ctx.runtime.device)
    counts = {}
    for split in ("train", "val"):
        manifest = extract_codes(tokenizer, ctx.data.dataset(split, ctx.config.image_size), ctx.out / "codes" / split,
                                 flip=ctx.config.flip and split == "train", runtime=ctx.runtime,
                                 progress=ctx.progress, extra_manifest={"data": ctx.data.source, "split": split})
        counts[split] = {"images": manifest["count"], "views": manifest["views"], "grid": manifest["grid"]}
    return counts


def _assemble(ctx: Context, resume: bool) -> dict:
    from ctfgen.checkpoint import checkpoint_step
    from ctfgen.clustering import CoarseMap
    from ctfgen.files import write_dir_atomic
    from ctfgen.models.gpt import GPT
    from ctfgen.models.refiner import Refiner
    from ctfgen.pipeline import INDEX_NAME, CTFPipeline
    from ctfgen.tokenizer.model import VQModel

    runs = ctx.out / "runs"
    baseline = GPT.from_pretrained(runs / "baseline" / "checkpoint") if ctx.config.baseline else None
    pipe = CTFPipeline(VQModel.from_pretrained(ctx.tokenizer_dir), CoarseMap.load(ctx.map_path),
                       GPT.from_pretrained(runs / "stage1" / "checkpoint"),
                       Refiner.from_pretrained(runs / "stage2" / "checkpoint"), baseline, class_names=ctx.data.classes)
    sources = {"tokenizer": ctx.tokenizer_dir, "map": ctx.map_path, "stage1": runs / "stage1" / "checkpoint",
               "stage2": runs / "stage2" / "checkpoint"} | (
        {"baseline": runs / "baseline" / "checkpoint"} if baseline else {})
    provenance = {name: {"from": str(path)} | ({"step": checkpoint_step(path)} if path.is_dir() else {})
                  for name, path in sources.items()}
    provenance["fit"] = {"command": ctx.command, "preset": ctx.preset}
    with warnings.catch_warnings():  # the preset's pipeline_dtype asks for the rounding a cast to it warns of
        warnings.filterwarnings("ignore", message=".*the cast to")
        write_dir_atomic(ctx.out / "pipeline", lambda tmp: pipe.save_pretrained(
            tmp, dtype=ctx.config.pipeline_dtype, provenance=provenance), lambda path: (path / INDEX_NAME).is_file())
    return {"pipeline": str(ctx.out / "pipeline"), "parts": pipe.part_paths()}


def _report(ctx: Context, resume: bool) -> dict:
    from ctfgen.fit.report import evaluate_and_report

    return evaluate_and_report(ctx)
