"""Running a fit: the folder, the choices and the data checked first (a refusal leaves nothing written), then each
step in order. A step done before with the same inputs is skipped; a training interrupted (even by SIGKILL) resumes
from its last checkpoint, exactly; a step whose inputs changed is redone, with every step after it that reads it, and
the line says why. One line as each step starts and one as it ends, with its time; progress bars in between.

Under torchrun every process runs this: the main one decides and writes, and the heavy steps run on all of them.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctfgen.errors import CtfgenError
from ctfgen.files import held_alone
from ctfgen.fit.data import FitData, fmnist_data, folder_fingerprint, is_data_dir, scan_folder
from ctfgen.fit.presets import PRESETS, FitConfig, resolve
from ctfgen.fit.state import FIT_JSON, FitState
from ctfgen.fit.steps import Context, Step, plan, step_fingerprint
from ctfgen.training.distributed import Runtime, all_gather_object, barrier, launched
from ctfgen.training.run import format_duration


@dataclass
class FitRequest:
    data: str
    out: str
    preset: str = "small"
    tokenizer: str | None = None  # reuse this tokenizer instead of training one
    overrides: dict = field(default_factory=dict)  # FitConfig fields: the --config file's, then the flags'
    inception_weights: str | None = None
    device: str = "auto"
    progress: bool = True
    command: str = "ctfgen fit"


def say(text: str) -> None:
    print(f"ctfgen fit: {text}", flush=True)


def fit(request: FitRequest) -> dict | None:
    """Run (or finish) the fit of `request`; the report's figures on the main process, None on the others.

    Under torchrun each process checks the data and makes the choices on its own (the same ones: nothing waits in a
    collective while one process decodes a large folder); the main one writes. The steps after the last heavy one
    (assembly, the report's sampling) run on the main process after the others have left the process group, so that
    none of them waits there longer than the group's timeout."""
    if request.preset not in PRESETS:
        raise CtfgenError(f"unknown --preset {request.preset!r}; use one of {', '.join(PRESETS)}")
    tic = time.perf_counter()
    with ExitStack() as lock:  # held from the first write to the end, by the main process
        with launched(request.device) as runtime:
            state, config, data, layout, data_inputs = prepare(request, speak=runtime.is_main)
            if runtime.is_main:  # one fit at a time in a folder: a second would train the same runs over each other
                lock.enter_context(held_alone(Path(request.out), f"--out {request.out}"))
                remove_stale_writes(Path(request.out), Path(FIT_JSON).stem)
                state.begin(command=request.command, preset=request.preset, data=_summary(data),
                            config=asdict(config))
            ctx = Context(Path(request.out), config, data, runtime, request.progress, request.command,
                          request.preset, request.tokenizer, request.inception_weights, layout)
            steps = plan(ctx, data_inputs)
            tail = max(i for i, step in enumerate(steps) if step.heavy) + 1
            run_steps(steps, range(tail), ctx, state)
        if not runtime.is_main:
            return None
        ctx.runtime = Runtime(device=runtime.device)
        run_steps(steps, range(tail, len(steps)), ctx, state)
    say(f"finished in {format_duration(time.perf_counter() - tic)}: the pipeline is {ctx.out / 'pipeline'}, the report "
        f"{ctx.out / 'report.md'}")
    return ctx.results["report"]


def run_steps(steps: list[Step], numbers: range, ctx: Context, state: FitState) -> None:
    """Steps `numbers` of `steps` in order: the main process decides (skip, resume or run) and records; a heavy step
    runs on every process, the others on the main one while the rest wait."""
    runtime = ctx.runtime
    for number in numbers:
        step = steps[number]
        label = f"[{number + 1}/{len(steps)}] {step.name}"
        action, why = all_gather_object(decide(state, step) if runtime.is_main else None, runtime)[0]
        if action == "skip":
            if runtime.is_main:
                record = state.step(step.name)
                ctx.results[step.name], ctx.seconds[step.name] = record.get("result", {}), record.get("seconds")
                if record.get("resumed"):
                    ctx.resumed.add(step.name)
                say(f"{label}: done before with the same inputs, skipped")
            continue
        if runtime.is_main:
            if action == "run" and step.run_dir is not None and step.run_dir.exists():
                shutil.rmtree(step.run_dir)  # another fingerprint's run (ours: inside the fit's folder)
            if not step.heavy and step.output is not None:  # (a training run or an extraction removes its own)
                remove_stale_writes(step.output.parent, step.output.stem)
            state.started(step.name, step.fingerprint, step.inputs)
            say(f"{label}: {step.what}" + (f" ({why})" if why else ""))
        barrier(runtime)
        started = time.perf_counter()
        result = step.run(ctx, action == "resume") if step.heavy or runtime.is_main else None
        barrier(runtime)
        if runtime.is_main:
            seconds = time.perf_counter() - started
            ctx.results[step.name], ctx.seconds[step.name] = result, round(seconds, 2)
            if action == "resume":  # the time of the interrupted part is not known
                ctx.resumed.add(step.name)
            state.done(step.name, step.fingerprint, step.inputs, seconds, result, resumed=action == "resume")
            say(f"{label}: done in {format_duration(seconds)}")


def remove_stale_writes(folder: Path, stem: str) -> None:
    """Remove what a write killed half-way left in the fit's `folder`: ctfgen.files writes `name` to a temporary
    sibling `.name.XXXXXXXX` (a file or a folder) and renames it when complete. Only hidden entries named so."""
    for path in folder.glob(f".{stem}.*") if folder.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare(request: FitRequest, speak: bool = True) -> tuple[FitState, FitConfig, FitData, dict | None, dict]:
    """The fit's state, choices and data, every check done and nothing written yet: (state, config, data, the
    layout to write when the data step must run, the data step's options); `speak`: say what was found."""
    state = FitState.open(request.out)
    out = Path(request.out)
    codebook, downsample = None, None
    if request.tokenizer:
        from ctfgen.tokenizer.model import VQModel

        tokenizer = VQModel.from_pretrained(request.tokenizer)
        codebook, downsample = tokenizer.config.codebook_size, tokenizer.config.downsample
    given = dict(request.overrides)
    early = resolve(request.preset, 1, 1, given, codebook_of_tokenizer=codebook)  # bad choices, before the data
    layout = None
    if request.data == "fmnist":
        if given.get("image_size", 32) != 32:
            raise CtfgenError("Fashion-MNIST is 32x32 (28x28 padded as the bundled set); leave out --image-size")
        data = fmnist_data()
        data_inputs = {"source": "fmnist", "images": data.fingerprint}
    else:
        images = folder_fingerprint(request.data, early.held_out, early.seed)
        data_inputs = {"source": str(Path(request.data).resolve()), "held_out": early.held_out, "seed": early.seed,
                       "images": images}
        record = state.step("data")
        if (record and record.get("state") == "done" and is_data_dir(out / "data")
                and record.get("fingerprint") == step_fingerprint("data", {"options": data_inputs, "reads": {}})):
            data = FitData(**record["result"])  # checked and laid out before: not decoded again
        else:
            data, layout = scan_folder(request.data, early.held_out, early.seed, images, out / "data",
                                       progress=request.progress and speak)
            for entry in data.skipped if speak else ():
                say(f"skipping unreadable image {entry['path']} ({entry['reason']})")
        if data.skipped and speak:
            say(f"{len(data.skipped)} unreadable image(s) skipped")
    config = resolve(request.preset, data.n_train, data.n_val, given, codebook_of_tokenizer=codebook,
                     data_defaults={"image_size": 32} if data.fmnist_like else None)
    if downsample is None:
        from ctfgen.tokenizer.model import VQ_PRESETS

        downsample = VQ_PRESETS[config.tokenizer_model].downsample
    if data.source != "fmnist" and config.image_size % downsample:
        raise CtfgenError(f"image_size {config.image_size} is not a multiple of the tokenizer's downsampling "
                          f"({downsample}); choose a multiple of {downsample}")
    if speak:
        say(f"{request.preset} preset: {data.n_train} training images, {data.n_val} held out ({data.held_out}), "
            f"{len(data.classes)} classes")
    return state, config, data, layout, data_inputs


def decide(state: FitState, step: Step) -> tuple[str, str]:
    """("skip" | "resume" | "run", why) for a step, from what fit.json says of it."""
    from ctfgen.checkpoint import TRAIN_STATE_NAME, checkpoint_step

    record = state.step(step.name)
    if record is None:
        return "run", ""
    if record.get("fingerprint") == step.fingerprint:
        if record.get("state") == "done":
            if step.output is None or step.output.exists():
                return "skip", ""
            return "run", f"redone: {step.output} is missing"
        checkpoint = step.run_dir / "checkpoint" if step.run_dir else None
        if checkpoint is not None and (checkpoint / TRAIN_STATE_NAME).is_file():
            return "resume", f"resuming the interrupted run from step {checkpoint_step(checkpoint)}"
        return "run", "interrupted before: started again"
    return "run", f"redone: {changes(record.get('inputs') or {}, step.inputs)}"


def changes(before: dict, now: dict) -> str:
    """What differs between a step's recorded inputs and its inputs now, in words."""
    old, new = before.get("options") or {}, now["options"]
    words = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
             if old.get(key) != new.get(key)]
    old_reads = before.get("reads") or {}
    words += [f"the {name} step changed" for name, fp in now["reads"].items() if old_reads.get(name) != fp]
    return "; ".join(words) or "its inputs changed"


def _summary(data: FitData) -> dict:
    summary = data.to_dict()
    summary["skipped"] = len(data.skipped)
    return summary


