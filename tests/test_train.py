import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ctfgen import cli
from ctfgen.checkpoint import load_weights
from ctfgen.files import held_alone
from ctfgen.training.schedule import learning_rate

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def codes(tmp_path_factory, fake_fmnist):
    """Train/test codes of the synthetic Fashion-MNIST under a tiny tokenizer, and a K=8 map."""
    from ctfgen.tokenizer.model import VQ_PRESETS, VQModel

    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    VQModel(VQ_PRESETS["VQ-tiny"]).save_pretrained(root / "tok")
    for split, extra in (("train", ["--flip"]), ("test", [])):
        assert cli.main(["extract", "--tokenizer", str(root / "tok"), "--data-dir", str(fake_fmnist), "--split",
                         split, "--out", str(root / split), *extra]) == 0
    assert cli.main(["cluster", "--tokenizer", str(root / "tok"), "--k", "8", "--out", str(root / "map.st")]) == 0
    return root


def train_args(codes, out, *extra):
    return ["train", "--codes", str(codes / "train"), "--map", str(codes / "map.st"), "--model", "GPT-tiny",
            "--out", str(out), "--batch-size", "16", "--lr", "1e-3", "--precision", "fp32", "--no-progress",
            "--log-every", "1", *extra]


def assert_same_weights(a_dir, b_dir, atol):
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        diff = float((a[name] - b[name]).abs().max())
        assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("stage", ["baseline", "stage1", "stage2"])
def test_each_stage_trains_and_improves(codes, tmp_path, stage, capsys):
    assert cli.main(train_args(codes, tmp_path / "run", "--stage", stage, "--steps", "30", "--eval-codes",
                               str(codes / "test"), "--eval-every", "30", "--eval-items", "32")) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert 0 <= metrics[-1]["eval_acc"] <= 1 and metrics[-1]["step"] == 30
    config = json.loads((tmp_path / "run/checkpoint/config.json").read_text())
    vocab = {"baseline": 64, "stage1": 8, "stage2": 64}[stage]
    assert config["model"]["vocab_size"] == vocab


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_n_layer_replaces_the_presets_depth(codes, tmp_path, stage):
    assert cli.main(train_args(codes, tmp_path / "run", "--stage", stage, "--steps", "1", "--n-layer", "3")) == 0
    config = json.loads((tmp_path / "run/checkpoint/config.json").read_text())
    assert config["model"]["n_layer"] == 3 and config["model"]["dim"] == 64  # GPT-tiny's width, 3 blocks
    assert any(name.startswith("layers.2.") for name in load_weights(tmp_path / "run/checkpoint"))


def test_n_layer_below_one_is_refused_in_one_line(codes, tmp_path, capsys):
    assert cli.main(train_args(codes, tmp_path / "run", "--stage", "stage1", "--n-layer", "0")) == 2
    assert capsys.readouterr().err == "ctfgen: error: --n-layer must be at least 1, got 0\n"
    assert not (tmp_path / "run").exists()


def test_a_log_gets_a_progress_line_at_every_tenth_of_the_run(codes, tmp_path, capsys, monkeypatch):
    """Where stderr is not a terminal (capsys's is not) there is no bar; a line at each tenth of the steps says how far
    the run is, at most one a minute, so a run of seconds prints none."""
    from ctfgen.training import run

    def progress_lines(out) -> list[str]:
        assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "20")) == 0
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("stage1: step")]

    assert progress_lines(tmp_path / "quiet") == []
    monkeypatch.setattr(run, "PROGRESS_LINE_SECONDS", 0)
    lines = progress_lines(tmp_path / "lines")
    assert [int(line.split()[2]) for line in lines] == list(range(2, 21, 2))
    assert all(" of 20, loss " in line and line.endswith(" left") for line in lines), lines


def test_a_resumed_run_logs_each_step_once(codes, tmp_path):
    """Lines a killed run logged after its last checkpoint (faked here) give way to the resumed run's own."""
    out = tmp_path / "run"
    assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "2")) == 0
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as log:  # steps 3 and 4 of a run killed before its next checkpoint
        log.writelines(json.dumps({"step": step, "loss": -1.0}) + "\n" for step in (3, 4))
    assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "4", "--resume")) == 0
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 for m in logged)


def test_a_second_run_of_the_same_folder_is_refused_while_the_first_runs(codes, tmp_path, capsys):
    """Two runs of one --out would write their checkpoints over each other: while one holds the folder (its lock,
    as a running run holds it), another is refused with one line and changes nothing; a refused or finished run
    lets go of it."""
    out = tmp_path / "run"
    assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "2")) == 0
    assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "2")) == 2  # no --resume: refused
    capsys.readouterr()
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    with held_alone(out, "the test"):
        assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "4", "--resume")) == 2
    assert capsys.readouterr().err.strip() == (f"ctfgen: error: --out {out} is in use by another ctfgen process "
                                               f"running now; wait for it to finish (or stop it) and run again")
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert cli.main(train_args(codes, out, "--stage", "stage1", "--steps", "4", "--resume")) == 0
    assert json.loads((out / "checkpoint" / "config.json").read_text())["step"] == 4
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint", "metrics.jsonl", "train_config.json"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(codes, tmp_path):
    """Kill a run hard after a checkpoint at step N; resuming to 2N gives the uninterrupted weights."""
    args = train_args(codes, tmp_path / "killed", "--stage", "stage1", "--steps", "100000", "--ckpt-every", "4")
    proc = subprocess.Popen([sys.executable, "-m", "ctfgen.cli", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "killed/checkpoint/config.json"
    deadline = time.time() + 120
    while not config.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = json.loads(config.read_text())["step"]
    assert n >= 4 and n % 4 == 0

    assert cli.main(train_args(codes, tmp_path / "killed", "--stage", "stage1", "--steps", str(2 * n),
                               "--ckpt-every", "4", "--resume")) == 0
    assert cli.main(train_args(codes, tmp_path / "straight", "--stage", "stage1", "--steps", str(2 * n),
                               "--ckpt-every", "4")) == 0
    assert json.loads(config.read_text())["step"] == 2 * n
    assert_same_weights(tmp_path / "killed/checkpoint", tmp_path / "straight/checkpoint", atol=1e-6)


def test_resume_removes_what_a_killed_save_left_and_nothing_else(codes, tmp_path):
    """A kill during a checkpoint write leaves a hidden temporary directory (or the previous checkpoint set
    aside); the next start of the run deletes those, and keeps anything of the user's that merely looks alike."""
    run = tmp_path / "run"
    assert cli.main(train_args(codes, run, "--stage", "stage2", "--steps", "2", "--snapshot-every", "1")) == 0
    stale = [run / ".checkpoint.k1ll3d", run / ".checkpoint.old.x7f2a9", run / "snapshots/.step_0000002.q9z"]
    for directory in stale:
        shutil.copytree(run / "checkpoint", directory)
    (stale[0] / "train_state.pt").unlink()  # killed half-way
    (stale[0] / "model.safetensors").rename(stale[0] / ".tmpQB1Bdd")  # killed inside safetensors' save_file
    users = run / ".checkpoint.notes"
    users.mkdir()
    (users / "todo.txt").write_text("mine")
    assert cli.main(train_args(codes, run, "--stage", "stage2", "--steps", "3", "--resume")) == 0
    assert not any(directory.exists() for directory in stale)
    assert (users / "todo.txt").read_text() == "mine"


def test_refuses_to_overwrite_and_needs_a_map(codes, tmp_path, capsys):
    assert cli.main(train_args(codes, tmp_path / "run", "--stage", "stage2", "--steps", "1")) == 0
    assert cli.main(train_args(codes, tmp_path / "run", "--stage", "stage2", "--steps", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    args = train_args(codes, tmp_path / "nomap", "--stage", "stage1", "--steps", "1")
    args.pop(args.index("--map") + 1), args.remove("--map")
    assert cli.main(args) == 2
    assert "--map" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_match_one(codes, tmp_path):
    common = ["--stage", "stage2", "--steps", "3", "--dropout", "0", "--class-dropout", "0"]
    one = subprocess.run([sys.executable, "-m", "ctfgen.cli", *train_args(codes, tmp_path / "one", *common)],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ctfgen.cli", *train_args(codes, tmp_path / "two", *common)],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert_same_weights(tmp_path / "one/checkpoint", tmp_path / "two/checkpoint", atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-5)


def logged(run_dir, key: str) -> torch.Tensor:
    return torch.tensor([json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
                        dtype=torch.float64)


def test_grad_accumulation_matches_one_big_batch(codes, tmp_path):
    """The same weights, and the same logged loss and gradient norm (the norm before clipping: AdamW's update and
    the clipping would hide gradients scaled by the number of micro-batches)."""
    common = ["--stage", "baseline", "--steps", "2", "--dropout", "0", "--class-dropout", "0"]
    assert cli.main(train_args(codes, tmp_path / "big", *common)) == 0
    assert cli.main(train_args(codes, tmp_path / "acc", *common, "--grad-accum", "4")) == 0
    assert_same_weights(tmp_path / "big/checkpoint", tmp_path / "acc/checkpoint", atol=1e-5)
    for key in ("loss", "grad_norm"):
        big, acc = logged(tmp_path / "big", key), logged(tmp_path / "acc", key)
        assert len(big) == 2
        torch.testing.assert_close(acc, big, rtol=1e-5, atol=0, msg=lambda detail, key=key: f"{key}: {detail}")


@pytest.mark.parametrize("schedule,warmup,total,rates", [
    # Warm-up: step s of w climbs to (s + 1) / w of the peak; then the peak.
    ("constant", 4, 10, {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 1.0}),
    # Cosine from the peak after warm-up to a tenth at step `total`: 0.1 + 0.45 (1 + cos(pi t)), t the share of
    # the steps after warm-up gone by: t = 1/3 -> 0.775, 1/2 -> 0.55, 2/3 -> 0.325, 1 (and after) -> 0.1.
    ("cosine", 4, 16, {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.775, 10: 0.55, 12: 0.325, 16: 0.1, 20: 0.1}),
    ("cosine", 0, 6, {0: 1.0, 2: 0.775, 3: 0.55, 6: 0.1}),
])
def test_learning_rate_schedule_by_hand(schedule, warmup, total, rates):
    for step, rate in rates.items():
        assert learning_rate(step, 2e-3, warmup, total, schedule) == pytest.approx(2e-3 * rate, rel=1e-12), step


def test_ema_follows_its_formula_and_export_writes_it_on_request(codes, tmp_path, capsys):
    """After each step, ema = decay * ema + (1 - decay) * weights: checked from the EMA kept at step 2, the weights
    of step 3 and the EMA kept at step 3. `ctfgen export --ema` writes that EMA, plain `export` the weights."""
    run = tmp_path / "run"
    args = train_args(codes, run, "--stage", "stage1", "--ema", "0.75")
    assert cli.main([*args, "--steps", "2"]) == 0
    ema_2 = torch.load(run / "checkpoint/train_state.pt")["ema"]
    assert cli.main([*args, "--steps", "3", "--resume"]) == 0
    ema_3, weights_3 = torch.load(run / "checkpoint/train_state.pt")["ema"], load_weights(run / "checkpoint")
    assert ema_3.keys() == weights_3.keys()
    for name, weight in weights_3.items():  # in float64, to the float32 rounding of the EMA kept
        expected = 0.75 * ema_2[name].double() + 0.25 * weight.double()
        torch.testing.assert_close(ema_3[name].double(), expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ema_3[name], weights_3[name]) for name in ema_3)  # the EMA is not the weights

    assert cli.main(["export", str(run / "checkpoint"), str(tmp_path / "ema"), "--ema"]) == 0
    assert cli.main(["export", str(run / "checkpoint"), str(tmp_path / "raw")]) == 0
    exported = load_weights(tmp_path / "ema")
    assert exported.keys() == ema_3.keys() and all(torch.equal(exported[n], ema_3[n]) for n in ema_3)
    raw = load_weights(tmp_path / "raw")
    assert all(torch.equal(raw[n], weights_3[n]) for n in weights_3)
    assert json.loads((tmp_path / "ema/config.json").read_text())["exported_from"]["ema"] == 0.75
    capsys.readouterr()

    # Where there is no EMA: a run without --ema, or a checkpoint without its training state.
    assert cli.main(train_args(codes, tmp_path / "plain", "--stage", "stage1", "--steps", "1")) == 0
    for source in (tmp_path / "plain/checkpoint", tmp_path / "raw"):
        assert cli.main(["export", str(source), str(tmp_path / "none"), "--ema"]) == 2
        assert "no EMA" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_fsdp_two_processes_match_one(codes, tmp_path):
    """2 gloo processes under FSDP train like one process, and resume from and into unsharded checkpoints."""
    from ctfgen.models.refiner import Refiner

    common = ["--stage", "stage2", "--dropout", "0", "--class-dropout", "0", "--ema", "0.9", "--eval-codes",
              str(codes / "test"), "--eval-every", "1", "--eval-items", "32"]

    def fsdp_run(out, *extra):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "ctfgen.cli", *train_args(codes, out, *common, "--fsdp", *extra)],
                             env=ENV, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr

    assert cli.main(train_args(codes, tmp_path / "one", *common, "--steps", "3")) == 0
    assert cli.main(train_args(codes, tmp_path / "half", *common, "--steps", "2", "--fsdp")) == 0  # unsharded
    fsdp_run(tmp_path / "fsdp", "--steps", "2")
    assert_same_weights(tmp_path / "half/checkpoint", tmp_path / "fsdp/checkpoint", atol=1e-5)
    # The same checkpoint format as an unsharded run: full weights, optimizer state numbered as usual, full EMA.
    Refiner.from_pretrained(tmp_path / "fsdp/checkpoint")
    half, fsdp = (torch.load(tmp_path / run / "checkpoint/train_state.pt") for run in ("half", "fsdp"))
    assert half.keys() == fsdp.keys() and half["optimizer"]["param_groups"] == fsdp["optimizer"]["param_groups"]
    torch.testing.assert_close(fsdp["optimizer"]["state"], half["optimizer"]["state"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fsdp["ema"], half["ema"], atol=1e-5, rtol=0)

    # Resume across the two kinds of run: FSDP from the unsharded checkpoint, unsharded from the FSDP one.
    shutil.copytree(tmp_path / "half", tmp_path / "into_fsdp")
    fsdp_run(tmp_path / "into_fsdp", "--steps", "3", "--resume")
    assert cli.main(train_args(codes, tmp_path / "fsdp", *common, "--steps", "3", "--resume")) == 0
    for run in ("into_fsdp", "fsdp"):
        assert_same_weights(tmp_path / "one/checkpoint", tmp_path / run / "checkpoint", atol=1e-5)
        ema = [torch.load(tmp_path / r / "checkpoint/train_state.pt")["ema"] for r in (run, "one")]
        torch.testing.assert_close(ema[0], ema[1], atol=1e-5, rtol=0)
        metrics = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                   for r in ("one", run)]
        # Not eval_acc: the output layer starts at zero, so after 3 steps many top-1 predictions are near-ties
        # that the order of a float reduction flips (0.0037 apart on an AVX-512 CPU); the losses are stable.
        for key, atol in (("loss", 1e-5), ("grad_norm", 1e-5), ("eval_loss", 1e-5)):
            torch.testing.assert_close(torch.tensor([m[key] for m in metrics[1]]),
                                       torch.tensor([m[key] for m in metrics[0]]), atol=atol, rtol=1e-5)


def test_views_1_trains_on_the_images_without_their_mirrors(codes, fake_fmnist, tmp_path, capsys):
    """--views 1 on codes extracted with --flip == training on codes extracted without it."""
    assert cli.main(["extract", "--tokenizer", str(codes / "tok"), "--data-dir", str(fake_fmnist), "--split",
                     "train", "--out", str(tmp_path / "plain")]) == 0
    flipped = train_args(codes, tmp_path / "flipped", "--stage", "stage1", "--steps", "3", "--views", "1")
    assert cli.main(flipped) == 0
    plain = train_args(codes, tmp_path / "plain_run", "--stage", "stage1", "--steps", "3")
    plain[plain.index("--codes") + 1] = str(tmp_path / "plain")
    assert cli.main(plain) == 0
    assert_same_weights(tmp_path / "flipped/checkpoint", tmp_path / "plain_run/checkpoint", atol=0)
    capsys.readouterr()
    assert cli.main(train_args(codes, tmp_path / "bad", "--stage", "stage1", "--steps", "3", "--views", "3")) == 2
    assert "stores 2 view(s)" in capsys.readouterr().err and not (tmp_path / "bad").exists()
