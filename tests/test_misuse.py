"""Mistakes and hostile input, one case per kind (issue 14). Through the CLI each must end with exit status 2,
exactly one `ctfgen: error:` line on stderr, no traceback, and no file created, changed or deleted; through the
API each must raise a CtfgenError that says what is wrong."""

import ctypes
import errno
import gzip
import json
import os
import shutil
import struct
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ctfgen import cli
from ctfgen.bench import benchmark
from ctfgen.checkpoint import save_checkpoint
from ctfgen.clustering import CoarseMap, cluster_codebook
from ctfgen.data.codes import CodeDataset, extract_codes
from ctfgen.data.datasets import FashionMNIST, read_idx
from ctfgen.data.images import is_ctfgen_npz, save_npz, save_png
from ctfgen.errors import CtfgenError
from ctfgen.evaluation.classifier import ClassifierConfig, FMNISTClassifier
from ctfgen.evaluation.npz import read_image_npz
from ctfgen.files import append_line, write_atomic
from ctfgen.models.config import GPTConfig, gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.tokenizer.evaluate import evaluate_tokenizer
from ctfgen.tokenizer.model import VQ_PRESETS, VQConfig, VQModel
from ctfgen.training.state import load_train_state
from test_pipeline import pipe, pipe_dir  # noqa: F401 (the tiny pipeline's fixtures)


def idx(array: np.ndarray, shape=None) -> bytes:
    shape = array.shape if shape is None else shape
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def a(tmp_path_factory, fake_fmnist):
    """Good inputs that the cases copy and break: a tokenizer, test-split codes, a K = 8 map, a 1-step stage-1
    run (checkpoint with train_state.pt), a classifier."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    tokenizer = VQModel(VQ_PRESETS["VQ-tiny"])
    tokenizer.save_pretrained(root / "tok")
    extract_codes(tokenizer, FashionMNIST("test", data_dir=fake_fmnist), root / "codes", batch_size=64,
                  progress=False)
    cluster_codebook(tokenizer.codebook_weights, 8, n_init=1).save(root / "map.st")
    assets = SimpleNamespace(root=root, fmnist=fake_fmnist, tok=root / "tok", codes=root / "codes",
                             map=root / "map.st", run=root / "run", classifier=root / "classifier")
    assert cli.main(train_args(assets, assets.codes, assets.map, root / "run", "--steps", "1")) == 0
    FMNISTClassifier(ClassifierConfig(channels=(4, 8, 8), hidden=8)).save_pretrained(assets.classifier)
    return assets


def train_args(a, codes, coarse_map, out, *extra):
    return ["train", "--stage", "stage1", "--codes", str(codes), "--map", str(coarse_map), "--model", "GPT-tiny",
            "--out", str(out), "--batch-size", "16", "--precision", "fp32", "--no-progress", *extra]


def train(a, w, codes=None, coarse_map=None, out=None, *extra):
    return train_args(a, codes or a.codes, coarse_map or a.map, out or w / "run", *extra)


def tok_eval(a, tokenizer, *extra):
    return ["tokenizer", "eval", "--tokenizer", str(tokenizer), "--data-dir", str(a.fmnist), "--device", "cpu", *extra]


def extract(a, out, *extra):
    return ["extract", "--tokenizer", str(a.tok), "--data-dir", str(a.fmnist), "--split", "test", "--out", str(out),
            *extra]


def cluster(a, out, *extra):
    return ["cluster", "--tokenizer", str(a.tok), "--k", "8", "--n-init", "1", "--out", str(out), *extra]


def user_folder(w) -> Path:
    (w / "mine").mkdir()
    (w / "mine" / "thesis.txt").write_text("years of work")
    return w / "mine"


# --- building broken inputs ----------------------------------------------------------------------

def tokenizer_with(a, w, change) -> Path:
    """A copy of the tokenizer whose config.json's "model" entry went through `change` (or the whole file, when
    `change` returns a value)."""
    shutil.copytree(a.tok, w / "tok")
    config = json.loads((w / "tok/config.json").read_text())
    config = change(config) or config
    (w / "tok/config.json").write_text(json.dumps(config))
    return w / "tok"


def set_model(**values):
    return lambda config: config["model"].update(values)


def tokenizer_weights(a, w, change) -> Path:
    shutil.copytree(a.tok, w / "tok")
    change(w / "tok/model.safetensors")
    return w / "tok"


def nan_weight(path):
    weights = load_file(path)
    weights["quant_conv.weight"][0, 0] = float("nan")
    save_file(weights, path)


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def run_with_state(a, w, write_state) -> list:
    shutil.copytree(a.run, w / "run")
    write_state(w / "run/checkpoint/train_state.pt")
    return train(a, w, None, None, None, "--steps", "3", "--resume")


class Hostile:
    """Unpickling this would run a shell command that leaves a file behind (the snapshot would see it)."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def bad_map(a, w, change_values=None, change_meta=None, dtype=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(a.map), framework="pt") as f:
        meta, values = f.metadata(), f.get_tensor("coarse_of_fine")
    if change_values:
        change_values(values)
    if change_meta:
        change_meta(meta)
    save_file({"coarse_of_fine": values.to(dtype or values.dtype)}, w / "bad.st", metadata=meta)
    return w / "bad.st"


def bad_codes(a, w, change) -> Path:
    shutil.copytree(a.codes, w / "codes")
    change(w / "codes")
    return w / "codes"


def edit_manifest(**values):
    def change(codes):
        manifest = json.loads((codes / "manifest.json").read_text())
        manifest.update(values)
        (codes / "manifest.json").write_text(json.dumps(manifest))
    return change


def poke_shard(name, index, value):
    def change(codes):
        array = np.load(codes / name, mmap_mode="r+")
        array[index] = value
        array.flush()
    return change


def fmnist_with_labels(a, w, labels) -> Path:
    shutil.copytree(a.fmnist, w / "fm")
    with gzip.open(w / "fm/t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx(np.asarray(labels)))
    return w / "fm"


def gzip_bomb_header(a, w) -> Path:
    """Test images whose header declares 2^31 x 28 x 28 pixels: refused before a byte past it is inflated."""
    shutil.copytree(a.fmnist, w / "fm")
    with gzip.open(w / "fm/t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx(np.zeros(16, np.uint8), shape=(2**31, 28, 28)))
    return w / "fm"


def npz(path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npz_declaring_huge_shape(path) -> Path:
    """An .npz whose arr_0.npy header declares 10^12 images and holds 16 bytes."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**12, 32, 32, 3)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(16))
    return path


def eval_args(a, samples):
    return ["eval", "--samples", str(samples), "--classifier", str(a.classifier), "--data-dir", str(a.fmnist),
            "--no-cache"]


def photo(path) -> Path:
    Image.new("RGB", (4, 4), "red").save(path, format="PNG")
    return path


def ctfgen_png(path) -> Path:
    return save_png(Image.new("RGB", (4, 4), "blue"), path)


def ctfgen_npz(path) -> Path:
    return save_npz(path, arr_0=np.zeros((1, 4, 4, 3), np.uint8))


def ctfgen_pngs_and(w, extra: str | None = None) -> Path:
    """A folder of ctfgen's PNGs (an earlier `--out`), and a user's file `extra` among them."""
    (w / "pngs").mkdir()
    ctfgen_png(w / "pngs/000000_class0.png")
    if extra:
        (w / "pngs" / extra).write_text("mine")
    return w / "pngs"


def sample(*outputs):
    """`ctfgen sample` with these output flags: refused before the (bundled) pipeline is even loaded."""
    return ["sample", "--classes", "0", *outputs]


def demo_over(existing: Path) -> list:
    """`ctfgen demo` where its default --out (demo.png in the working directory) is `existing`."""
    assert existing.name == "demo.png"
    return ["demo"]


def reroll(w, *outputs):
    return ["reroll", str(photo(w / "in.png")), "--class", "0", *outputs]


def foreign_partial(w) -> Path:
    """An output path whose `.partial` sibling is a user's folder: extract must not clear it."""
    user_folder(w).rename(w / "codes.partial")
    return w / "codes"


def symlink_to_photo(w) -> Path:
    (w / "link").symlink_to(photo(w / "photo.png"))
    return w / "link"


def folder_with_a_bad_image(w) -> Path:
    """Two classes of two good 16x16 PNGs each, and one undecodable bad.jpg in class b."""
    for c, colour in (("a", "red"), ("b", "green")):
        (w / "images" / c).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), colour).save(w / "images" / c / f"good{k}.png")
    (w / "images/b/bad.jpg").write_bytes(b"not a jpeg" * 8)
    return w / "images"


def redundancy_on_folder(a, w, *extra):
    return ["redundancy", "--tokenizer", a.tok, "--map", a.map, "--data", folder_with_a_bad_image(w), "--image-size",
            "16", "--n", "8", "--out", w / "study", *extra]


def read_only_dir(w) -> Path:
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return w / "ro"


# --- the cases: (build the bad input in w, return the command line), expected words of the error ------------

CASES = {
    # Data loss: an output path that exists and is not ctfgen's own is never replaced; ctfgen's needs --overwrite.
    "extract over a user folder": (lambda a, w: extract(a, user_folder(w)), "is not extracted codes"),
    "extract over earlier codes": (lambda a, w: extract(a, shutil.copytree(a.codes, w / "c")), "--overwrite"),
    "extract beside a foreign .partial": (lambda a, w: extract(a, foreign_partial(w)), "not left by `ctfgen extract`"),
    "export over a user folder": (lambda a, w: ["export", str(a.run / "checkpoint"), str(user_folder(w))],
                                  "is not a ctfgen checkpoint"),
    "export over a checkpoint": (lambda a, w: ["export", a.run / "checkpoint", shutil.copytree(a.tok, w / "t")],
                                 "--overwrite"),
    "assemble over a user folder": (
        lambda a, w: ["assemble", "--out", str(user_folder(w)), "--tokenizer", str(a.tok), "--baseline", str(a.tok)],
        "is not a ctfgen pipeline"),
    "cluster over a user file": (lambda a, w: cluster(a, photo(w / "map.st")), "is not a ctfgen coarse map"),
    "cluster over a ctfgen map": (lambda a, w: cluster(a, shutil.copy(a.map, w / "map.st")), "--overwrite"),
    "cluster onto a symlink": (lambda a, w: cluster(a, symlink_to_photo(w), "--overwrite"), "symbolic link"),
    "cluster onto a device": (lambda a, w: cluster(a, "/dev/null", "--overwrite"), "special file"),
    "cluster onto a directory": (lambda a, w: cluster(a, user_folder(w)), "is a directory"),
    "redundancy over a user folder": (
        lambda a, w: ["redundancy", "--tokenizer", str(a.tok), "--map", str(a.map), "--data-dir", str(a.fmnist),
                      "--out", str(user_folder(w))], "is not a redundancy study"),
    "reconstruct over a user PNG": (lambda a, w: ["tokenizer", "reconstruct", "--tokenizer", str(a.tok), "--data-dir",
                                                  str(a.fmnist), "--out", str(photo(w / "photo.png"))],
                                    "is not a PNG written by ctfgen"),
    "train into a user folder": (lambda a, w: train(a, w, None, None, user_folder(w), "--steps", "1"),
                                 "is not a training run"),
    "tokenizer train into a user folder": (
        lambda a, w: ["tokenizer", "train", "--out", str(user_folder(w)), "--model", "VQ-tiny", "--data-dir",
                      str(a.fmnist), "--steps", "1"], "is not a training run"),
    "train-classifier into a user folder": (
        lambda a, w: ["eval", "train-classifier", "--out", str(user_folder(w)), "--data-dir", str(a.fmnist)],
        "is not a feature classifier"),
    "sample --grid over a user PNG": (lambda a, w: sample("--grid", photo(w / "g.png")),
                                      "is not a PNG written by ctfgen"),
    "sample --preview-grid over ctfgen's PNG": (lambda a, w: sample("--preview-grid", ctfgen_png(w / "p.png")),
                                                "pass --overwrite"),
    "sample --npz over a user .npz": (lambda a, w: sample("--npz", npz(w / "s.npz", arr_0=np.zeros(3))),
                                      "is not a sample file written by ctfgen"),
    "sample --npz over ctfgen's .npz": (lambda a, w: sample("--npz", ctfgen_npz(w / "s.npz")), "pass --overwrite"),
    "sample --npz over a user file, with --overwrite": (
        lambda a, w: sample("--npz", photo(w / "s.npz"), "--overwrite"), "is not a sample file written by ctfgen"),
    "sample --out over a user folder": (lambda a, w: sample("--out", user_folder(w), "--overwrite"),
                                        "is not a folder of PNGs written by ctfgen"),
    "sample --out over ctfgen's PNGs and a user file": (
        lambda a, w: sample("--out", ctfgen_pngs_and(w, "notes.txt"), "--overwrite"), "is not a folder of PNGs"),
    "sample --out over ctfgen's PNGs": (lambda a, w: sample("--out", ctfgen_pngs_and(w)), "pass --overwrite"),
    "sample --out onto a file": (lambda a, w: sample("--out", photo(w / "p.png")), "is a file"),
    "sample --grid and --npz on one path": (lambda a, w: sample("--grid", w / "x", "--npz", w / "x"),
                                            "name the same path"),
    "sample --grid inside --out": (lambda a, w: sample("--out", w / "pngs", "--grid", w / "pngs/grid.png"),
                                   "inside the --out directory"),
    "sample --seed beyond 32 bits": (lambda a, w: sample("--seed", str(2**70), "--grid", w / "g.png"),
                                     "seed must be between 0 and 4294967295, got 1180591620717411303424"),
    "sample --stage2-steps 0": (lambda a, w: sample("--stage2-steps", "0", "--grid", w / "g.png"),
                                "steps must be between 1 and"),
    "sample --stage2-steps 4 with a one-pass refiner": (
        lambda a, w: sample("--stage2-steps", "4", "--grid", w / "g.png"), "needs a refiner trained with --reveal"),
    "reroll --stage2-steps 0": (lambda a, w: reroll(w, "--stage2-steps", "0", "--grid", w / "g.png"),
                                "steps must be between 1 and"),
    "demo over a user's demo.png": (lambda a, w: demo_over(photo(w / "demo.png")), "is not a PNG written by ctfgen"),
    "demo over an earlier demo.png": (lambda a, w: demo_over(ctfgen_png(w / "demo.png")), "pass --overwrite"),
    "reroll --grid over a user PNG": (lambda a, w: reroll(w, "--grid", photo(w / "g.png"), "--overwrite"),
                                      "is not a PNG written by ctfgen"),
    "reroll --npz over ctfgen's .npz": (lambda a, w: reroll(w, "--npz", ctfgen_npz(w / "v.npz")), "pass --overwrite"),
    "reroll --out over a user folder": (lambda a, w: reroll(w, "--out", user_folder(w)),
                                        "is not a folder of PNGs written by ctfgen"),
    "output under a file": (lambda a, w: extract(a, photo(w / "p.png") / "codes"), "is a file, not a directory"),
    "output where the system refuses to write": (lambda a, w: cluster(a, "/sys/ctfgen-misuse/map.st"), "/sys"),
    "output in a read-only directory": (lambda a, w: cluster(a, read_only_dir(w) / "map.st"), "not writable"),
    # A checkpoint's config.json and weights.
    "config.json not an object": (lambda a, w: tok_eval(a, tokenizer_with(a, w, lambda c: [1, 2])), "not a ctfgen"),
    "config.json without a model": (lambda a, w: tok_eval(a, tokenizer_with(a, w, lambda c: {"kind": c["kind"]})),
                                    "no \"model\""),
    "config.json unknown key": (lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(colour="red"))),
                                "unknown model config keys 'colour'"),
    "config.json wrong type": (lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(ch="32"))),
                               "ch must be a whole number"),
    "config.json zero size": (lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(codebook_size=0))),
                              "codebook_size must be between 1"),
    "config.json negative size": (lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(num_res_blocks=-1))),
                                  "num_res_blocks must be between 1"),
    "config.json beyond any model": (lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(codebook_size=10**12))),
                                     "codebook_size must be between 1"),
    "config.json of terabytes, checked on the meta device": (
        lambda a, w: tok_eval(a, tokenizer_with(a, w, set_model(codebook_size=2**24, codebook_embed_dim=2**16))),
        "does not match its config.json"),
    "NaN weights": (lambda a, w: tok_eval(a, tokenizer_weights(a, w, nan_weight)), "NaN or infinite weights"),
    "truncated weights": (lambda a, w: tok_eval(a, tokenizer_weights(a, w, cut_in_half)), "cannot read"),
    # --resume with a damaged or hostile train_state.pt.
    "truncated train_state.pt": (lambda a, w: run_with_state(a, w, cut_in_half), "cannot read"),
    "random train_state.pt": (lambda a, w: run_with_state(a, w, lambda p: p.write_bytes(os.urandom(4096))),
                              "cannot read"),
    "hostile train_state.pt": (lambda a, w: run_with_state(a, w, lambda p: torch.save(Hostile(), p)), "cannot read"),
    "train_state.pt of another shape": (lambda a, w: run_with_state(a, w, lambda p: torch.save({"step": "ten"}, p)),
                                        "not a ctfgen training state"),
    "resume with another model": (lambda a, w: run_with_state(a, w, lambda p: None) + ["--model", "GPT-XS"],
                                  "resume with the options"),
    # Coarse maps.
    "map index out of range": (lambda a, w: train(a, w, None, bad_map(a, w, lambda v: v.__setitem__(0, 8))),
                               "must lie in [0, k = 8)"),
    "map index negative": (lambda a, w: train(a, w, None, bad_map(a, w, lambda v: v.__setitem__(0, -1))),
                           "must lie in [0, k = 8)"),
    "map of fractions": (lambda a, w: train(a, w, None, bad_map(a, w, dtype=torch.float32)), "not integer cluster ids"),
    "map without metadata": (lambda a, w: train(a, w, None, bad_map(a, w, change_meta=lambda m: m.pop("k"))),
                             "missing or malformed metadata"),
    "map with an empty cluster": (lambda a, w: train(a, w, None, bad_map(a, w, lambda v: v.masked_fill_(v == 3, 2))),
                                  "clusters without a member"),
    "map that is not one": (lambda a, w: train(a, w, None, photo(w / "map.st")), "not a ctfgen coarse map"),
    # Codes folders.
    "manifest not JSON": (lambda a, w: train(a, w, bad_codes(a, w, lambda c: (c / "manifest.json").write_text("{"))),
                          "not valid JSON"),
    "manifest with a bad count": (lambda a, w: train(a, w, bad_codes(a, w, edit_manifest(count=0))),
                                  "count must be at least 1"),
    "manifest pointing outside": (
        lambda a, w: train(a, w, bad_codes(a, w, edit_manifest(
            shards=[{"codes": "../../codes.0.npy", "labels": "labels.0.npy", "count": 64}]))), "inside the directory"),
    "truncated shard": (lambda a, w: train(a, w, bad_codes(a, w, lambda c: cut_in_half(c / "codes.0.npy"))),
                        "cannot read"),
    "tokens out of range": (lambda a, w: train(a, w, bad_codes(a, w, poke_shard("codes.0.npy", (5, 0, 1, 1), 64))),
                            "tokens outside [0, 64)"),
    "labels out of range": (lambda a, w: train(a, w, bad_codes(a, w, poke_shard("labels.0.npy", 3, -3))),
                            "class labels outside"),
    "labels beyond any dataset": (lambda a, w: train(a, w, bad_codes(a, w, poke_shard("labels.0.npy", 3, 2**40))),
                                  "class labels outside"),
    # Flags.
    "zero --batch-size": (lambda a, w: train(a, w, None, None, None, "--batch-size", "0"), "--batch-size must be at"),
    "negative --grad-accum": (lambda a, w: train(a, w, None, None, None, "--grad-accum", "-1"), "--grad-accum"),
    "zero --steps": (lambda a, w: train(a, w, None, None, None, "--steps", "0"), "--steps must be at least 1"),
    "NaN --lr": (lambda a, w: train(a, w, None, None, None, "--lr", "nan"), "--lr must be a finite number"),
    "zero --n": (lambda a, w: ["redundancy", "--tokenizer", str(a.tok), "--map", str(a.map), "--data-dir",
                               str(a.fmnist), "--n", "0", "--out", str(w / "r")], "--n must be at least 1"),
    "zero --n-init": (lambda a, w: cluster(a, w / "m.st", "--n-init", "0"), "--n-init must be at least 1"),
    "--limit 0 is not 'all'": (lambda a, w: tok_eval(a, a.tok, "--limit", "0"), "--limit must be at least 1"),
    "zero --k for precision/recall": (lambda a, w: ["eval", "--floor", "--k", "0"], "--k must be at least 1"),
    "seed beyond 64 bits": (lambda a, w: cluster(a, w / "m.st", "--seed", str(2**64)), "--seed must be between 0"),
    "negative seed": (lambda a, w: cluster(a, w / "m.st", "--seed", "-1"), "--seed must be between 0"),
    "not a number": (lambda a, w: train(a, w, None, None, None, "--steps", "many"),
                     "--steps must be a whole number, got 'many'"),
    "unknown device": (lambda a, w: tok_eval(a, a.tok, "--device", "abacus"), "is not a device"),
    "zero bench --batch": (lambda a, w: ["bench", "--batch", "0"], "batch must be at least 1"),
    "zero bench --repeats": (lambda a, w: ["bench", "--repeats", "0"], "repeats must be at least 1"),
    # Datasets and sample files.
    "redundancy on an unreadable image": (lambda a, w: redundancy_on_folder(a, w), "pass --skip-bad-images"),
    "IDX labels out of range": (lambda a, w: tok_eval(a, a.tok, "--data-dir", str(fmnist_with_labels(
        a, w, [12] + [0] * 63))), "Fashion-MNIST has classes 0 to 9"),
    "IDX header of a gzip bomb": (lambda a, w: tok_eval(a, a.tok, "--data-dir", str(gzip_bomb_header(a, w))),
                                  "declares shape"),
    "npz labels out of range": (lambda a, w: eval_args(a, npz(w / "s.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8),
                                                              labels=np.array([10, 11, 12]))), "below 10"),
    "npz declaring a huge shape": (lambda a, w: eval_args(a, npz_declaring_huge_shape(w / "s.npz")), "declares"),
}


def snapshot(*roots) -> dict:
    """Every path under `roots` with its size and modification time (directories too: an entry made and removed
    again changes its directory's time)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                path = Path(folder, name)
                info = path.lstat()
                state[str(path)] = (info.st_size, info.st_mtime_ns)
            state[folder] = os.lstat(folder).st_mtime_ns
    return state


CAP_DAC_OVERRIDE, CAP_FOWNER = 1, 3  # linux/capability.h: write and chmod regardless of a file's mode and owner


def without_file_privileges(fn):
    """fn(), called in a thread that lacks root's power to ignore file permissions (CAP_DAC_OVERRIDE, CAP_FOWNER),
    so that a read-only directory is read-only to it as to any other user. Linux capabilities belong to a thread:
    the thread drops them from its effective and permitted sets (os.access, which ctfgen's checks use, consults the
    permitted set for root) and ends; the rest of the test process keeps them. Files the test made stay readable,
    since root owns them."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    outcome = {}

    def drop_then_call():
        try:
            header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3; pid 0: this thread
            if libc.capget(ctypes.byref(header), data) != 0:
                raise OSError(ctypes.get_errno(), "capget")
            mask = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_FOWNER)) & 0xFFFFFFFF
            data[0].effective &= mask
            data[0].permitted &= mask
            if libc.capset(ctypes.byref(header), data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
        except (OSError, AttributeError) as e:  # not Linux, or capabilities locked away (seccomp)
            outcome["skip"] = f"cannot drop root's file capabilities here ({e}): run the suite as a user other " \
                              "than root to check this case"
            return
        try:
            outcome["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=drop_then_call)
    thread.start()
    thread.join()
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses_with_one_line_and_changes_nothing(case, a, tmp_path, monkeypatch, capsys):
    build, expected = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where a relative or default output would land
    argv = [str(arg) for arg in build(a, work)]
    before = snapshot(work, a.root)
    if case == "output in a read-only directory" and os.geteuid() == 0:  # root writes into read-only directories
        code = without_file_privileges(lambda: cli.main(argv))
    else:
        code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("ctfgen: error:"), repr(captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
    assert expected in captured.err, captured.err
    assert snapshot(work, a.root) == before


def test_overwrite_replaces_ctfgen_output_only(a, tmp_path, capsys):
    """--overwrite replaces what ctfgen wrote (no progress bar drawn on a non-terminal stderr); it never
    makes a user's folder replaceable."""
    shutil.copytree(a.codes, tmp_path / "codes")
    (tmp_path / "codes/labels.0.npy").unlink()  # an earlier, damaged extraction: still ours by its manifest
    assert cli.main(extract(a, tmp_path / "codes", "--overwrite")) == 0
    assert len(CodeDataset(tmp_path / "codes")) == 64 and capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]  # no .partial, no old copy left
    assert cli.main(extract(a, user_folder(tmp_path), "--overwrite")) == 2
    assert (tmp_path / "mine/thesis.txt").read_text() == "years of work"


def test_overwrite_replaces_earlier_samples_whole(pipe_dir, tmp_path, capsys):  # noqa: F811
    """--overwrite replaces sample's own outputs: the PNG folder as a whole (no image of the earlier run stays)."""
    outputs = ["--npz", tmp_path / "s.npz", "--grid", tmp_path / "g.png", "--out", tmp_path / "pngs"]
    run = ["sample", "--pipeline", pipe_dir, *outputs]
    assert cli.main([str(arg) for arg in run + ["--classes", "0,1"]]) == 0
    assert is_ctfgen_npz(tmp_path / "s.npz") and len(list((tmp_path / "pngs").iterdir())) == 2
    assert cli.main([str(arg) for arg in run + ["--classes", "3"]]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main([str(arg) for arg in run + ["--classes", "3", "--overwrite"]]) == 0
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000_class3.png"]
    with np.load(tmp_path / "s.npz") as f:
        assert f["labels"].tolist() == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "pngs", "s.npz"]  # no temporary left
    demo = ["demo", "--pipeline", str(pipe_dir), "--per-class", "1", "--out", str(tmp_path / "demo.png")]
    assert cli.main(demo) == 0 and cli.main(demo) == 2 and cli.main(demo + ["--overwrite"]) == 0


def test_train_on_bad_codes_writes_nothing(a, tmp_path, capsys):
    codes = bad_codes(a, tmp_path, poke_shard("codes.0.npy", (0, 0, 0, 0), 64))
    assert cli.main(train(a, tmp_path, codes, None, tmp_path / "run", "--steps", "1")) == 2
    assert not (tmp_path / "run").exists()


def test_redundancy_skips_an_unreadable_image_when_told(a, tmp_path, capsys):
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert cli.main([str(arg) for arg in redundancy_on_folder(a, tmp_path, "--skip-bad-images", "--json")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["n_images"] == 4 and figures["n_skipped"] == 1
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["redundancy.json", "redundancy.png"]


# --- writes the system refuses: a full disk, a read-only file system, a folder removed while it is written --------

def failing_write(error: int, safetensors_style: bool = False):
    """A stand-in for a serializer (save_file, np.savez, Image.save, Path.write_text, torch.save) that starts writing
    where it was told, then fails as the system does with errno `error` (safetensors: its own error type, as it
    reports one)."""
    from safetensors import SafetensorError

    def write(*args, **kwargs):
        target = next(arg for arg in args if isinstance(arg, (str, os.PathLike)) or hasattr(arg, "write"))
        if hasattr(target, "write"):
            target.write(b"half a file")
        else:
            Path(target).write_bytes(b"half a file")
        if safetensors_style:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(error)} (os error {error})")
        raise OSError(error, os.strerror(error))

    return write


def folder_removed_meanwhile(original):
    """A stand-in for a serializer whose output folder (the temporary one being filled) is removed by someone else
    just before it writes: the real write then fails (ENOENT)."""
    def write(*args, **kwargs):
        target = next(arg for arg in args if isinstance(arg, (str, os.PathLike)))
        shutil.rmtree(Path(target).parent)
        return original(*args, **kwargs)

    return write


def full(error: int, safetensors_style: bool = False):
    return lambda original: failing_write(error, safetensors_style)


SAVE_FILE, SAVEZ, SAVE, PNG_SAVE, WRITE_TEXT = ((safetensors.torch, "save_file"), (np, "savez"), (np, "save"),
                                                (Image.Image, "save"), (Path, "write_text"))
WRITE_FAILURES = {  # case: (command line in w, the writer that fails, how, what the line says)
    "cluster on a full disk": (lambda a, w, p: cluster(a, w / "map.st"), SAVE_FILE, full(errno.ENOSPC, True),
                               "map.st: no space is left on its device"),
    "export to a read-only file system": (lambda a, w, p: ["export", a.tok, w / "tok"], SAVE_FILE,
                                          full(errno.EROFS, True), "tok: its file system is read-only"),
    "export while its folder is removed": (lambda a, w, p: ["export", a.tok, w / "tok"], SAVE_FILE,
                                           folder_removed_meanwhile, "tok: its folder was removed"),
    "extract on a full disk": (lambda a, w, p: extract(a, w / "codes"), SAVE, full(errno.ENOSPC),
                               "codes: no space is left"),
    "redundancy on a full disk": (lambda a, w, p: ["redundancy", "--tokenizer", a.tok, "--map", a.map, "--data-dir",
                                                   a.fmnist, "--n", "8", "--out", w / "r"], WRITE_TEXT,
                                  full(errno.ENOSPC), "r: no space is left"),
    "assemble on a full disk": (lambda a, w, p: ["assemble", "--out", w / "pipe", "--tokenizer", p / "tokenizer",
                                                 "--baseline", p / "baseline"], WRITE_TEXT, full(errno.ENOSPC),
                                "no space is left"),
    "sample --npz on a full disk": (lambda a, w, p: ["sample", "--pipeline", p, "--classes", "0", "--npz", w / "s.npz"],
                                    SAVEZ, full(errno.ENOSPC), "s.npz: no space is left"),
    "sample --grid without permission": (lambda a, w, p: ["sample", "--pipeline", p, "--classes", "0", "--grid",
                                                          w / "g.png"], PNG_SAVE, full(errno.EACCES),
                                         "g.png: permission denied"),
    "sample --out on a full disk": (lambda a, w, p: ["sample", "--pipeline", p, "--classes", "0,1", "--out",
                                                     w / "pngs"], PNG_SAVE, full(errno.ENOSPC), "pngs: no space"),
}


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_refused_write_ends_in_one_line_and_leaves_nothing(case, a, pipe_dir, tmp_path, monkeypatch,  # noqa: F811
                                                             capsys):
    build, (owner, name), make_writer, expected = WRITE_FAILURES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = [str(arg) for arg in build(a, work, pipe_dir)]
    before = snapshot(a.root)
    monkeypatch.setattr(owner, name, make_writer(getattr(owner, name)))
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("ctfgen: error: cannot write"), captured.err
    assert expected in captured.err, captured.err
    assert list(work.iterdir()) == [] and snapshot(a.root) == before  # no output, no temporary file or folder


def test_a_log_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_line(log, '{"step": 1}')
    real_write = os.write

    def write_half_then_fail(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch, pytest.raises(CtfgenError, match="metrics.jsonl: no space is left"):
        patch.setattr(os, "write", write_half_then_fail)
        append_line(log, '{"step": 2, "loss": 1.5}')
    assert log.read_text() == '{"step": 1}\n'


def test_a_checkpoint_with_train_state_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    full_disk = failing_write(errno.ENOSPC)

    def torch_save(obj, f):  # as torch.save on a full disk: to a file object, the OSError; to a path, its own error
        if not hasattr(f, "write"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        full_disk(obj, f)

    monkeypatch.setattr(torch, "save", torch_save)
    with pytest.raises(CtfgenError, match="ckpt: no space is left"):
        save_checkpoint(tmp_path / "ckpt", {"kind": "gpt", "model": {}}, {"w": torch.zeros(2)}, train_state={"step": 1})
    assert list(tmp_path.iterdir()) == []


# --- the API ----------------------------------------------------------------------------------------

def test_configs_refuse_bad_values():
    with pytest.raises(CtfgenError, match="dim must be between 1"):
        GPTConfig(dim=0)
    with pytest.raises(CtfgenError, match="vocab_size must be a whole number"):
        GPTConfig(vocab_size=4096.5)
    with pytest.raises(CtfgenError, match="resid_dropout_p must be a finite number"):
        gpt_config("GPT-tiny", 64, 64, 10, resid_dropout_p=float("nan"))
    with pytest.raises(CtfgenError, match="multiples of 32"):
        VQConfig(ch=48)


def test_huge_config_is_refused_before_allocating(a, tmp_path):
    GPT(gpt_config("GPT-tiny", 8, 64, 10)).save_pretrained(tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt/config.json").read_text())
    config["model"] |= {"vocab_size": 2**24, "dim": 2**14, "n_layer": 1024}  # ~10^13 parameters
    (tmp_path / "gpt/config.json").write_text(json.dumps(config))
    with pytest.raises(CtfgenError, match="does not match its config.json"):
        GPT.from_pretrained(tmp_path / "gpt")


def test_bench_refuses_an_empty_batch_or_no_timed_run(pipe):  # noqa: F811
    with pytest.raises(CtfgenError, match="batch must be at least 1, got 0"):
        benchmark(pipe, batch=0)
    with pytest.raises(CtfgenError, match="repeats must be at least 1, got 0"):
        benchmark(pipe, repeats=0)


def test_coarse_map_values_are_checked():
    with pytest.raises(CtfgenError, match="clusters without a member"):
        CoarseMap(torch.tensor([0, 0, 2]), 3, "kmeans", 0, 0.0, "x")
    with pytest.raises(CtfgenError, match="must lie in"):
        CoarseMap(torch.tensor([0, 1, 3]), 3, "kmeans", 0, 0.0, "x")
    with pytest.raises(CtfgenError, match="n-init"):
        cluster_codebook(torch.randn(16, 4), 4, n_init=0)


def test_atomic_writes_refuse_symlinks_devices_and_foreign_directories(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CtfgenError, match="symbolic link"):
        write_atomic(tmp_path / "link", lambda tmp: Path(tmp).write_text("new"))
    with pytest.raises(CtfgenError, match="special file"):
        write_atomic(Path("/dev/null"), lambda tmp: Path(tmp).write_text("new"))
    mine = user_folder(tmp_path)
    with pytest.raises(CtfgenError, match="not written by ctfgen"):
        save_checkpoint(mine, {"kind": "gpt", "model": {}}, {"w": torch.zeros(2)})
    assert target.read_text() == "keep me" and (mine / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine", "target.txt"]  # no temporary left


def test_readers_refuse_damaged_and_hostile_files(a, tmp_path):
    shutil.copytree(a.run, tmp_path / "run")
    torch.save(Hostile(), tmp_path / "run/checkpoint/train_state.pt")
    with pytest.raises(CtfgenError, match="cannot read"):
        load_train_state(tmp_path / "run/checkpoint")
    assert not Path("pwned").exists()
    (tmp_path / "bomb-idx3-ubyte").write_bytes(idx(np.zeros(4, np.uint8), shape=(2**20, 2**10)))
    with pytest.raises(CtfgenError, match="declares shape"):
        read_idx(tmp_path / "bomb-idx3-ubyte")
    with pytest.raises(CtfgenError, match="declares"):
        read_image_npz(npz_declaring_huge_shape(tmp_path / "huge.npz"))
    with pytest.raises(CtfgenError, match="tokens outside"):
        CodeDataset(bad_codes(a, tmp_path, poke_shard("codes.0.npy", (1, 0, 0, 0), 999)))
    with pytest.raises(CtfgenError, match="--limit must be at least 1"):
        evaluate_tokenizer(VQModel.from_pretrained(a.tok), FashionMNIST("test", data_dir=a.fmnist), limit=0)
