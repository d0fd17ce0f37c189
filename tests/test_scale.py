"""Work at scale: under torchrun, `ctfgen sample` and `ctfgen extract` share the batches out over the processes and
write exactly what one process writes (two gloo processes on the CPU here)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctfgen import cli
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.params import SamplingParams
from ctfgen.tokenizer.model import VQ_PRESETS, VQModel
from ctfgen.training.distributed import Runtime, round_robin_batches
from test_pipeline import make_parts

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctfgen.cli"]


def one_process(*args) -> None:
    assert cli.main(list(args)) == 0


def two_processes(*args) -> None:
    run = subprocess.run([*TORCHRUN, *args], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_round_robin_batches_are_whole_batches_of_one_process():
    # 5 batches of 7 over 2 processes: rank 0 takes batches 0, 2, 4 (the last of 2 items), rank 1 batches 1, 3
    assert round_robin_batches(30, 7, Runtime(rank=0, world_size=2)) == [range(0, 7), range(14, 21), range(28, 30)]
    assert round_robin_batches(30, 7, Runtime(rank=1, world_size=2)) == [range(7, 14), range(21, 28), None]
    assert round_robin_batches(30, 7, Runtime()) == [range(start, min(start + 7, 30)) for start in range(0, 30, 7)]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return CTFPipeline(**make_parts()).save_pretrained(tmp_path_factory.mktemp("pipe") / "pipe", dtype=None)


@pytest.mark.slow
def test_two_processes_sample_what_one_samples(pipe_dir, tmp_path):
    args = ["sample", "--pipeline", str(pipe_dir), "--per-class", "3", "--batch", "7", "--seed", "5",
            "--temperature", "1.1", "--stage2-temperature", "1.1"]
    for run, name in ((one_process, "one"), (two_processes, "two")):
        (tmp_path / name).mkdir()
        run(*args, "--npz", str(tmp_path / name / "s.npz"), "--preview-grid", str(tmp_path / name / "p.png"))
    one, two = np.load(tmp_path / "one/s.npz"), np.load(tmp_path / "two/s.npz")
    assert one.files == two.files == ["arr_0", "labels", "class_names", "software"]  # software: ctfgen's tag
    for key in one.files:
        assert one[key].dtype == two[key].dtype and one[key].shape == two[key].shape
        assert one[key].tobytes() == two[key].tobytes()
    assert files(tmp_path / "one")["p.png"] == files(tmp_path / "two")["p.png"]  # the stage-1 previews too
    # and one process gives what the pipeline call gives
    out = CTFPipeline.from_pretrained(pipe_dir)(range(10), per_class=3, seed=5, batch_size=7, output_type="np",
                                                sampling=SamplingParams(temperature=1.1, cfg_scale=2.0),
                                                stage2_sampling=SamplingParams(temperature=1.1))
    assert np.array_equal(one["arr_0"], out.images) and np.array_equal(one["labels"], out.labels)


@pytest.mark.slow
def test_two_processes_extract_what_one_extracts(fake_fmnist, tmp_path):
    torch.manual_seed(0)
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(tmp_path / "tok")
    # 64 images in batches of 10: rank 1 has no batch in the last round
    args = ["extract", "--tokenizer", str(tmp_path / "tok"), "--data-dir", str(fake_fmnist), "--split", "test",
            "--flip", "--batch-size", "10", "--device", "cpu"]
    one_process(*args, "--out", str(tmp_path / "one"))
    two_processes(*args, "--out", str(tmp_path / "two"))
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert list(one) == list(two) == ["codes.0.npy", "labels.0.npy", "manifest.json"]
    for name in one:
        assert one[name] == two[name], name


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu():
    """scripts/gpu_check.sh's CPU mode: the same path as on a GPU (pipeline, compiled-decode bench, FSDP training
    under torchrun) at tiny shapes, ending in one JSON line; so that the GPU check cannot rot between GPU loans."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    run = subprocess.run([str(script), "--cpu", "--tiny", "--repeats", "1", "--train-steps", "2"],
                         env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHON": sys.executable},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    assert result["device"] == "cpu" and result["shape"]["model"] == "GPT-tiny"
    assert result["sampling"]["ctf"]["images_per_s"] > 0 and result["sampling"]["baseline"]["images_per_s"] > 0
    assert result["training_fsdp"]["ok"] and result["training_fsdp"]["steps"] == 2
