"""The last step of a fit: the evaluation, written to DIR/report.md, DIR/report.json and DIR/report/ (figures).

    tokenizer   PSNR and codebook usage on the held-out images
    training    each transformer's held-out loss over its run (a PNG each, with matplotlib; the numbers always)
    samples     a grid of CTF samples and one of the baseline's, a row per class
    FID         CTF and the baseline against the held-out images, where a feature network fits the data: the shipped
                Fashion-MNIST classifier for its kind (32x32 padded grey), or Inception-v3 (--inception-weights)
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ctfgen.errors import CtfgenError
from ctfgen.files import write_atomic
from ctfgen.fit.markdown import report_markdown
from ctfgen.fit.steps import LOG_EVERY

SAMPLE_BATCH = 250
# A held-out loss that fell by more than this share over the last quarter of training is still falling: the model
# has not converged and more steps would help (the 5-epoch small preset under-trains a 16,384-word baseline: 1.4%).
STILL_FALLING = 0.01


def evaluate_and_report(ctx) -> dict:
    """Evaluate DIR/pipeline and write the report; returns report.json's figures."""
    from ctfgen.data.images import add_row_labels, make_grid, save_png_dir
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.tokenizer.evaluate import evaluate_tokenizer

    c = ctx.config
    pipe = CTFPipeline.from_pretrained(ctx.out / "pipeline", device=ctx.runtime.device)
    modes = ["ctf"] + (["baseline"] if pipe.baseline is not None else [])
    held_out = ctx.data.dataset("val", c.image_size)
    report = {"command": ctx.command, "preset": ctx.preset, "data": ctx.data.to_dict(), "config": asdict(c),
              "notes": [], "seconds": dict(ctx.seconds), "resumed": sorted(ctx.resumed)}
    report["tokenizer"] = evaluate_tokenizer(pipe.tokenizer, held_out, progress=ctx.progress)
    report["training"] = {stage: loss_curve(ctx.out / "runs" / stage / "metrics.jsonl", c.steps)
                          for stage in ("stage1", "stage2", "baseline") if stage != "baseline" or c.baseline}
    for stage, curve in report["training"].items():
        drop = last_quarter_drop(curve)
        curve["fell_last_quarter"] = drop
        if drop is not None and drop > STILL_FALLING * curve["eval_loss"][-1]:
            report["notes"].append(
                f"{stage}'s held-out loss was still falling: it fell {drop:.3f} nats "
                f"({drop / curve['eval_loss'][-1]:.1%}) over the last quarter of training; more steps should help "
                f"(`steps` above {c.steps} in a --config TOML; the transformers then train again from the start)")
    figures = loss_figures(report["training"])
    if figures is None:
        figures = {}
        report["notes"].append("matplotlib is not installed (pip install 'ctfgen[plots]'): no loss-curve PNGs; the "
                               "held-out losses are in report.json")
    rows = list(range(pipe.num_classes))
    for mode in modes:
        out = pipe(rows, per_class=c.grid_per_class, mode=mode, seed=c.seed, output_type="pt",
                   batch_size=SAMPLE_BATCH, progress=ctx.progress)
        grid = make_grid(out.images, ncol=c.grid_per_class)
        figures[f"samples_{mode}.png"] = add_row_labels(grid, pipe.class_names, row_height=out.images.shape[-2])
    report["fid"] = fid_scores(ctx, pipe, modes, held_out, report["notes"])
    save_png_dir(sorted(figures.items()), ctx.out / "report")
    report["figures"] = sorted(f"report/{name}" for name in figures)
    write_atomic(ctx.out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    text = report_markdown(report)
    write_atomic(ctx.out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return {"psnr": report["tokenizer"]["psnr"], "codebook_usage": report["tokenizer"]["codebook_usage"],
            "eval_loss": {stage: curve["eval_loss"][-1] if curve["eval_loss"] else None
                          for stage, curve in report["training"].items()},
            "fid": {mode: (scores or {}).get("fid") for mode, scores in report["fid"].items()}}


def loss_curve(metrics_path: Path, steps: int) -> dict:
    """The training and held-out losses of a run's metrics.jsonl; a step logged twice (a run resumed from an earlier
    checkpoint logs the steps after it again) counts once, as last logged. The training loss is read at the steps it
    is logged at (every LOG_EVERY and the last): a held-out measurement between them repeats the previous one."""
    by_step = {}
    for line in metrics_path.read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    logged = [s for s in sorted(by_step) if "loss" in by_step[s] and (s % LOG_EVERY == 0 or s == steps)]
    held = [s for s in sorted(by_step) if "eval_loss" in by_step[s]]
    return {"train_steps": logged, "train_loss": [by_step[s]["loss"] for s in logged], "steps": held,
            "eval_loss": [by_step[s]["eval_loss"] for s in held], "eval_acc": [by_step[s]["eval_acc"] for s in held]}


def last_quarter_drop(curve: dict) -> float | None:
    """How far a run's held-out loss fell over the last quarter of its training (negative: it rose), from the first
    measurement at or after three quarters of the steps to the last; None without two measurements there."""
    steps, losses = curve["steps"], curve["eval_loss"]
    if not steps:
        return None
    start = next(i for i, step in enumerate(steps) if 4 * step >= 3 * steps[-1])
    return losses[start] - losses[-1] if start < len(steps) - 1 else None


def loss_figures(curves: dict) -> dict | None:
    """A PNG (PIL image) of each run's losses against its steps; None without matplotlib. Drawn on a Figure of its
    own (no pyplot): a library must not switch the caller's plotting backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from PIL import Image

    images = {}
    for stage, curve in curves.items():
        figure = Figure(figsize=(5, 3.2), dpi=100)
        axes = figure.subplots()
        axes.plot(curve["train_steps"], curve["train_loss"], alpha=0.5, label="training batch")
        axes.plot(curve["steps"], curve["eval_loss"], "o-", label="held-out")
        axes.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=stage)
        axes.legend()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        images[f"loss_{stage}.png"] = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return images


def feature_network(ctx, notes: list):
    """The network FID is computed with, or None (said in `notes`): Inception-v3 when its weights are given, the
    shipped Fashion-MNIST classifier for 32x32 images of its kind."""
    from ctfgen.evaluation.features import load_feature_network

    if ctx.inception_weights:
        return load_feature_network("inception", inception_weights=ctx.inception_weights, device=ctx.runtime.device)
    if ctx.data.fmnist_like and ctx.config.image_size == 32:
        return load_feature_network("fmnist", device=ctx.runtime.device)
    notes.append(f"no FID: no feature network fits these images (the shipped classifier scores 28x28 grey images of "
                 f"Fashion-MNIST's kind at 32 px; these are {ctx.config.image_size} px"
                 + ("" if ctx.data.fmnist_like else ", not grey 28x28")
                 + "); pass --inception-weights FILE for FID with Inception-v3. The sample grids show the quality")
    return None


def fid_scores(ctx, pipe, modes: list[str], held_out, notes: list) -> dict:
    """FID, Inception-style score and precision/recall of `eval_per_class` samples of each class, per mode, against
    the held-out images; {} without a feature network."""
    from ctfgen.evaluation.evaluate import EvalOptions, network_labels, score
    from ctfgen.evaluation.features import extract_features
    from ctfgen.evaluation.metrics import gaussian_stats
    from ctfgen.evaluation.reference import ReferenceStats

    network = feature_network(ctx, notes)
    if network is None:
        return {}
    images, labels = held_out_uint8(held_out)
    # A folder's class ids follow its sorted names: matched to the classifier's by name, or none where they differ.
    labels, note = network_labels(labels, pipe.class_names, network)
    if note:
        notes.append(note)
    features = extract_features(network, images, desc="held-out features")
    reference = ReferenceStats("held-out", len(images), *gaussian_stats(features.pool), pool=features.pool,
                               labels=labels)
    if features.spatial is not None:
        reference.mu_s, reference.sigma_s = gaussian_stats(features.spatial)
    results = {}
    for mode in modes:
        out = pipe(range(pipe.num_classes), per_class=ctx.config.eval_per_class, mode=mode, seed=ctx.config.seed,
                   output_type="np", batch_size=SAMPLE_BATCH, progress=ctx.progress)
        try:
            scores = score(extract_features(network, out.images, desc=f"{mode} features"),
                           None if labels is None else network_labels(out.labels, pipe.class_names, network)[0],
                           reference, network, EvalOptions(seed=ctx.config.seed))
        except CtfgenError as e:  # too few images for a covariance or for k neighbours
            notes.append(f"no FID for {mode}: {e}")
            results[mode] = None
            continue
        scores.pop("per_class", None)
        results[mode] = {"features": network.name, "n_samples": len(out.images), "n_ref": len(images), **scores}
    return results


@torch.no_grad()
def held_out_uint8(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out image as uint8 [N, H, W, 3] (the layout samples come in), and its class id."""
    from torch.utils.data import DataLoader

    from ctfgen.data.datasets import collate_images, to_uint8

    images, labels = [], []
    for batch, batch_labels, _ in DataLoader(dataset, batch_size=500, collate_fn=collate_images):
        images.append(to_uint8(batch).permute(0, 2, 3, 1).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)
