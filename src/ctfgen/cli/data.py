"""From a tokenizer to a pipeline: `ctfgen cluster`, `extract`, `redundancy`, `export` and `assemble`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ctfgen.choices import CLUSTER_METHODS
from ctfgen.cli.common import (
    add_data_flags,
    add_device_flag,
    add_json_flag,
    add_overwrite_flag,
    add_tokenizer_flag,
    add_weights_dtype_flag,
    load_tokenizer_and_data,
    number_flag,
    print_json,
)
from ctfgen.errors import CtfgenError
from ctfgen.files import write_dir_atomic
from ctfgen.validation import NON_NEGATIVE, POSITIVE, SEED, check_destination, check_output


def register(commands) -> None:
    cluster = commands.add_parser("cluster", help="k-means (or random) clustering of a codebook -> coarse map")
    add_tokenizer_flag(cluster)
    number_flag(cluster, "--k", POSITIVE, required=True, help="number of clusters (coarse vocabulary)")
    cluster.add_argument("--method", choices=CLUSTER_METHODS, default="kmeans", help="k-means, or a random "
                         "partition (the control) (default %(default)s)")
    number_flag(cluster, "--seed", SEED, default=0, help="k-means++ starts or the random partition "
                         "(default %(default)s)")
    number_flag(cluster, "--n-init", POSITIVE, default=4, help="k-means restarts; the best is kept "
                         "(default %(default)s)")
    cluster.add_argument("--out", required=True, help="output .safetensors file")
    add_json_flag(cluster)
    add_overwrite_flag(cluster, "a coarse map written by ctfgen")
    cluster.set_defaults(func=cmd_cluster)

    extract = commands.add_parser("extract", help="encode a dataset to token grids on disk (torchrun shards it)")
    add_tokenizer_flag(extract)
    add_data_flags(extract, skip_bad=False)  # the codes hold every image of the split
    extract.add_argument("--split", default="train", help="the data split (default %(default)s)")
    extract.add_argument("--out", required=True, help="codes directory to write")
    extract.add_argument("--flip", action="store_true", help="also store the codes of mirrored images")
    extract.add_argument("--ten-crop", action="store_true", help="image folders: ten crops of a 1.1x resize")
    number_flag(extract, "--batch-size", POSITIVE, default=500, help="images per batch (default %(default)s)")
    number_flag(extract, "--num-workers", NON_NEGATIVE, default=0, help="data loading processes (default %(default)s: "
                         "in this process)")
    add_device_flag(extract)
    add_overwrite_flag(extract, "codes extracted before")
    extract.set_defaults(func=cmd_extract)

    redundancy = commands.add_parser("redundancy", help="swap tokens within clusters and measure the damage")
    add_tokenizer_flag(redundancy)
    redundancy.add_argument("--map", required=True, help="coarse map from `ctfgen cluster`")
    add_data_flags(redundancy)
    redundancy.add_argument("--split", default="test", help="the data split (default %(default)s)")
    number_flag(redundancy, "--n", POSITIVE, default=1000, help="images (default %(default)s)")
    number_flag(redundancy, "--seed", SEED, default=0, help="the images and the swaps (default %(default)s)")
    redundancy.add_argument("--out", required=True, help="directory for redundancy.png and redundancy.json")
    add_device_flag(redundancy)
    add_json_flag(redundancy)
    add_overwrite_flag(redundancy, "an earlier study's redundancy.png and redundancy.json")
    redundancy.set_defaults(func=cmd_redundancy)

    export = commands.add_parser("export", help="copy a checkpoint's weights without training state (as they are, "
                                                "or cast with --dtype)")
    export.add_argument("checkpoint", help="checkpoint directory to read")
    export.add_argument("out", help="checkpoint directory to write")
    export.add_argument("--ema", dest="ema_weights", action="store_true", help="write the EMA of the weights that "
                        "a run trained with --ema keeps beside them, instead of the weights")
    add_weights_dtype_flag(export)
    add_overwrite_flag(export, "a checkpoint written by ctfgen")
    export.set_defaults(func=cmd_export)

    assemble = commands.add_parser("assemble", help="gather trained parts into a pipeline directory "
                                                    "(CTFPipeline format)")
    assemble.add_argument("--out", required=True, help="pipeline directory to write")
    assemble.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    assemble.add_argument("--map", help="coarse map (CTF)")
    assemble.add_argument("--stage1", help="stage-1 checkpoint directory (CTF)")
    assemble.add_argument("--stage2", help="stage-2 checkpoint directory (CTF)")
    assemble.add_argument("--baseline", help="baseline checkpoint directory")
    assemble.add_argument("--class-names", help="'fmnist' or comma-separated names, in class-id order")
    add_weights_dtype_flag(assemble)
    add_overwrite_flag(assemble, "a pipeline written by ctfgen (its parts and pipeline.json; other files stay)")
    assemble.set_defaults(func=cmd_assemble)


def cmd_cluster(args) -> None:
    from ctfgen.clustering import CoarseMap, cluster_codebook
    from ctfgen.tokenizer.model import VQModel

    check_output(args.out, flag="--out", what="a ctfgen coarse map", is_ours=CoarseMap.is_coarse_map,
                 overwrite=args.overwrite, directory=False)
    tic = time.perf_counter()
    codebook = VQModel.from_pretrained(args.tokenizer).codebook_weights
    coarse_map = cluster_codebook(codebook, args.k, method=args.method, seed=args.seed, n_init=args.n_init)
    coarse_map.save(args.out)
    result = {"out": str(args.out), "k": coarse_map.k, "method": coarse_map.method, "seed": coarse_map.seed,
              "inertia": coarse_map.inertia, "cluster_sizes": coarse_map.size_stats(),
              "fingerprint": coarse_map.fingerprint, "seconds": round(time.perf_counter() - tic, 2)}
    if args.json:
        print_json(result)
    else:
        sizes = result["cluster_sizes"]
        print(f"wrote {args.out}: {coarse_map.vocab_size} codes -> {coarse_map.k} clusters ({args.method}), "
              f"inertia {coarse_map.inertia:.2f}, sizes {sizes['min']}..{sizes['max']} in {result['seconds']}s")


def cmd_extract(args) -> None:
    from ctfgen.data.codes import extract_codes, is_codes_dir
    from ctfgen.data.datasets import load_dataset
    from ctfgen.tokenizer.model import VQModel
    from ctfgen.training.distributed import launched

    check_output(args.out, flag="--out", what="extracted codes", is_ours=is_codes_dir, overwrite=args.overwrite)
    with launched(args.device) as runtime:
        tokenizer = VQModel.from_pretrained(args.tokenizer, device=runtime.device)
        dataset = load_dataset(args.data, args.split, data_dir=args.data_dir, image_size=args.image_size)
        tic = time.perf_counter()
        manifest = extract_codes(tokenizer, dataset, args.out, flip=args.flip, ten_crop=args.ten_crop,
                                 batch_size=args.batch_size, num_workers=args.num_workers, runtime=runtime,
                                 extra_manifest={"data": args.data, "split": args.split,
                                                 "tokenizer": str(args.tokenizer)})
        if runtime.is_main:
            print(f"wrote {args.out}: {manifest['count']} images x {manifest['views']} views of "
                  f"{manifest['grid'][0]}x{manifest['grid'][1]} tokens in {time.perf_counter() - tic:.0f}s")


def cmd_redundancy(args) -> None:
    from ctfgen.clustering import CoarseMap
    from ctfgen.data.images import make_grid, save_png
    from ctfgen.evaluation.redundancy import redundancy_study

    out = check_output(args.out, flag="--out", what="a redundancy study", overwrite=args.overwrite,
                       is_ours=_is_redundancy_study)
    model, dataset = load_tokenizer_and_data(args, args.split)
    coarse_map = CoarseMap.load(args.map)
    figures, grid = redundancy_study(model, coarse_map, dataset, args.n, seed=args.seed)

    def write(tmp: Path) -> None:  # the figure and its numbers appear together, or neither
        save_png(make_grid(grid, ncol=4), tmp / "redundancy.png")
        (tmp / "redundancy.json").write_text(json.dumps(figures, indent=2) + "\n")

    write_dir_atomic(out, write, _is_redundancy_study)
    figures["grid"] = str(out / "redundancy.png")
    if args.json:
        print_json(figures)
    else:
        print(f"cluster swap PSNR {figures['kmeans_psnr']:.2f} dB vs random-map swap {figures['random_psnr']:.2f} dB "
              f"over {figures['n_images']} images; grid (original | reconstruction | k-means swap | random swap) "
              f"at {figures['grid']}")


def _is_redundancy_study(path: Path) -> bool:
    """Whether `path` holds an earlier `ctfgen redundancy` output and nothing else."""
    return (path / "redundancy.json").is_file() and {p.name for p in path.iterdir()} <= {"redundancy.png",
                                                                                        "redundancy.json"}


def cmd_export(args) -> None:
    from ctfgen.checkpoint import is_checkpoint, load_config, load_weights, save_checkpoint, stored_dtypes

    check_output(args.out, flag="output directory", what="a ctfgen checkpoint", is_ours=is_checkpoint,
                 overwrite=args.overwrite)
    config = load_config(args.checkpoint, kind=None)
    train = config.pop("train", None)
    config["exported_from"] = {"step": config.pop("step", None), "dtype": args.dtype}
    weights, stored = load_weights(args.checkpoint), stored_dtypes(args.checkpoint)
    if args.ema_weights:
        from ctfgen.training.state import load_ema_weights

        weights = load_ema_weights(args.checkpoint, weights)
        stored = {name: value.dtype for name, value in weights.items()}  # the EMA's own (fp32)
        config["exported_from"]["ema"] = train.get("ema") if isinstance(train, dict) else None
    save_checkpoint(args.out, config, weights, dtype=args.dtype, stored=stored)
    print(f"exported {'the EMA weights of ' if args.ema_weights else ''}{args.checkpoint} -> {args.out} "
          f"({_weights_written(args.dtype, stored.values())})")


def _weights_written(dtype: str | None, stored) -> str:
    """How the weights were written: cast to `dtype`, or as they were stored (in these dtypes)."""
    from ctfgen.checkpoint import DTYPE_NAMES

    if dtype is not None:
        return f"weights cast to {dtype}"
    return f"weights as stored: {', '.join(sorted({DTYPE_NAMES[d] for d in stored}))}"


def cmd_assemble(args) -> None:
    from ctfgen.checkpoint import checkpoint_step
    from ctfgen.clustering import CoarseMap
    from ctfgen.data.datasets import FMNIST_CLASSES
    from ctfgen.models.gpt import GPT
    from ctfgen.models.refiner import Refiner
    from ctfgen.pipeline import INDEX_NAME, CTFPipeline
    from ctfgen.tokenizer.model import VQModel

    out = check_output(args.out, flag="--out", what="a ctfgen pipeline", overwrite=args.overwrite,
                       is_ours=lambda path: (path / INDEX_NAME).is_file())
    ctf = [args.map, args.stage1, args.stage2]
    if any(ctf) and not all(ctf):
        raise CtfgenError("CTF needs all of --map, --stage1 and --stage2")
    if not any(ctf) and not args.baseline:
        raise CtfgenError("give the CTF parts (--map, --stage1, --stage2), a --baseline, or both")
    if args.class_names == "fmnist":
        class_names = list(FMNIST_CLASSES)
    else:
        class_names = args.class_names.split(",") if args.class_names else None
    pipe = CTFPipeline(VQModel.from_pretrained(args.tokenizer),
                       CoarseMap.load(args.map) if args.map else None,
                       GPT.from_pretrained(args.stage1) if args.stage1 else None,
                       Refiner.from_pretrained(args.stage2) if args.stage2 else None,
                       GPT.from_pretrained(args.baseline) if args.baseline else None, class_names=class_names)
    provenance = {}
    for name in ("tokenizer", "map", "stage1", "stage2", "baseline"):
        source = getattr(args, name)
        if source and Path(source).is_dir():  # a checkpoint (the map is a file)
            provenance[name] = {"from": str(source), "step": checkpoint_step(source)}
        elif source:
            provenance[name] = {"from": str(source)}
    _check_part_paths(pipe, out)
    pipe.save_pretrained(out, dtype=args.dtype, provenance=provenance)
    models = (pipe.tokenizer, pipe.stage1, pipe.stage2, pipe.baseline)
    stored = [d for m in models if m is not None for d in m.stored_dtypes.values()]
    print(f"wrote pipeline {args.out}: {', '.join(pipe.part_paths())} ({_weights_written(args.dtype, stored)}"
          f"{'; the tokenizer to fp16' if args.dtype == 'bf16' else ''})")


def _check_part_paths(pipe, out: Path) -> None:
    """Refuse to assemble into a directory where a part's path holds something ctfgen did not write."""
    from ctfgen.checkpoint import is_checkpoint
    from ctfgen.clustering import CoarseMap

    for name, relative in pipe.part_paths().items():
        path, is_map = out / relative, name == "coarse_map"
        check_destination(path, directory=not is_map)
        if path.exists() and not (CoarseMap.is_coarse_map(path) if is_map else is_checkpoint(path)):
            raise CtfgenError(f"{path} is in the way of the pipeline's {name} and was not written by ctfgen; it is "
                              f"left as it is: choose another --out")
