"""One training loop for every transformer stage.

    baseline  GPT over fine tokens (vocabulary V)           next-token cross-entropy
    stage1    GPT over coarse labels (vocabulary K)         next-token cross-entropy
    stage2    refiner: class + coarse grid -> fine tokens   per-position cross-entropy, one pass

LlamaGen's defaults (AdamW lr 1e-4, wd 0.05, betas 0.9/0.95, clip 1.0, class dropout 0.1), bf16
autocast, gradient accumulation, optional EMA, held-out loss/accuracy, a JSONL metrics log and
atomic checkpoints every N steps and on SIGTERM/SIGINT. The data order, the flip view of every
item and all dropout masks depend only on (seed, step) and the saved RNG state, so `--resume`
continues exactly. Runs alone or under torchrun: DDP, or with --fsdp FSDP2 (parameters, gradients,
optimizer state and EMA sharded over the processes). Checkpoints always hold full tensors, so they
are the same with and without FSDP and with any number of processes.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .batches import StepBatchSampler
from .checkpoint import (
    capture_rng,
    check_optimizer_state,
    check_weight_shapes,
    is_run_dir,
    load_train_state,
    load_weights,
    restore_rng,
    save_checkpoint,
)
from .clustering import CoarseMap
from .codes import CodeDataset
from .distributed import Runtime, all_reduce_sum, barrier, launched
from .errors import CtfgenError
from .models.gpt import GPT, TransformerBlock, gpt_config
from .models.refiner import Refiner, refiner_config
from .precision import autocast_context
from .schedule import LR_SCHEDULES, learning_rate
from .tokenizer.train import StopFlag
from .validation import check_options, check_output

STAGES = ("baseline", "stage1", "stage2")


@dataclass
class TrainConfig:
    stage: str
    codes: str
    out: str
    model: str = "GPT-S"
    map: str | None = None
    eval_codes: str | None = None
    steps: int = 1000
    batch_size: int = 64  # global, over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: constant (LlamaGen) or cosine decay to lr / 10 at the last step
    class_dropout: float = 0.1
    dropout: float | None = None  # overrides token/residual/FFN dropout (LlamaGen: 0.1)
    ema: float = 0.0  # EMA decay; 0 disables
    eval_every: int = 500
    eval_items: int = 2000
    ckpt_every: int = 500
    snapshot_every: int = 0  # also keep the weights of every N-th step under snapshots/ (0: never)
    views: int = 0  # train on the first N stored views of each image (1: without the mirrors); 0: all
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # bf16 autocast on CUDA / bf16-capable CPUs, else fp32 (see ctfgen.precision)
    device: str = "auto"
    resume: bool = False
    fsdp: bool = False  # under torchrun, FSDP2 instead of DDP; ignored (unsharded) in a single process
    compile: bool = False  # torch.compile the forward and backward (~30 s once; ~1.2x faster steps on a CPU)
    progress: bool = True


class StageData:
    """Turns stored fine grids into (inputs, labels, targets) for a stage."""

    def __init__(self, stage: str, codes: CodeDataset, coarse_map: CoarseMap | None):
        if stage not in STAGES:
            raise CtfgenError(f"unknown --stage {stage!r}; use one of {', '.join(STAGES)}")
        if stage != "baseline" and coarse_map is None:
            raise CtfgenError(f"--stage {stage} needs --map (a coarse map from `ctfgen cluster`)")
        self.stage, self.codes, self.coarse_map = stage, codes, coarse_map
        h, w = codes.manifest["grid"]
        self.block_size = h * w
        self.num_classes = int(codes.labels.max()) + 1
        self.fine_vocab = codes.manifest["codebook_size"]

    @property
    def input_vocab(self) -> int:
        return self.fine_vocab if self.stage == "baseline" else self.coarse_map.k

    @property
    def target_vocab(self) -> int:
        return self.coarse_map.k if self.stage == "stage1" else self.fine_vocab

    def batch(self, index, views: torch.Tensor | None = None):
        """Fine grids of `index` (view `views[i]` of item i; view 0 by default) as stage tensors."""
        grids = self.codes.grids(index)  # [B, views, h, w]
        views = torch.zeros(len(grids), dtype=torch.long) if views is None else views
        fine = grids[torch.arange(len(grids)), views].flatten(1)  # [B, T]
        labels = self.codes.labels[torch.as_tensor(index)]
        if self.stage == "baseline":
            return fine, labels, fine
        coarse = self.coarse_map.coarse_of_fine[fine]
        return coarse, labels, (coarse if self.stage == "stage1" else fine)


def build_model(cfg: TrainConfig, data: StageData):
    overrides = {"class_dropout_prob": cfg.class_dropout}
    if cfg.dropout is not None:
        overrides |= {"token_dropout_p": cfg.dropout, "resid_dropout_p": cfg.dropout, "ffn_dropout_p": cfg.dropout}
    shape = dict(block_size=data.block_size, num_classes=data.num_classes)
    if cfg.stage == "stage2":
        return Refiner(refiner_config(cfg.model, vocab_size=data.fine_vocab, coarse_vocab_size=data.input_vocab,
                                      **shape, **overrides))
    return GPT(gpt_config(cfg.model, vocab_size=data.target_vocab, **shape, **overrides))


def stage_loss(model, inputs, labels, targets):
    """Mean cross-entropy and number of correct top-1 predictions over every predicted position."""
    logits, loss = model(inputs, labels, targets)  # logits [B, T, vocab]
    return loss, (logits.argmax(-1) == targets).sum()


def attention_kernel(device: torch.device):
    """The attention kernel to train with: on CPUs the explicit (math) one, whose backward over these short
    sequences is ~5x faster than the fused flash kernel's (measured on GPT-S, 65 positions); on GPUs the default."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()


def gradient_sync(train_model, last_micro_step: bool):
    """Under DDP, all-reduce the gradients only on the last micro step of an optimizer step."""
    return nullcontext() if last_micro_step or not hasattr(train_model, "no_sync") else train_model.no_sync()


def train_step(train_model, model, optimizer, micro_batches: list, cfg: TrainConfig, device: torch.device):
    """One optimizer step over micro-batches of (inputs, labels, targets); returns (mean loss, grad norm).
    `train_model` is what the forward runs through (compiled, DDP- or FSDP-wrapped), `model` the module."""
    total_loss = torch.zeros((), device=device)
    for i, (inputs, labels, targets) in enumerate(micro_batches):
        with gradient_sync(train_model, last_micro_step=i == len(micro_batches) - 1):
            with autocast_context(cfg.precision, device), attention_kernel(device):
                _, loss = train_model(inputs, labels, targets)
            (loss / len(micro_batches)).backward()
        total_loss += loss.detach() / len(micro_batches)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, grad_norm


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices and embeddings, not on norms (as LlamaGen / nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def held_out_metrics(model, data: StageData, cfg: TrainConfig, runtime: Runtime, batch_size: int = 250) -> dict:
    """Loss and top-1 accuracy on the first `eval_items` held-out items, split over processes."""
    was_training = model.training
    model.eval()
    n = min(cfg.eval_items, len(data.codes))
    totals = torch.zeros(3, dtype=torch.float64)
    mine = torch.arange(runtime.rank, n, runtime.world_size)
    # As many batches on every rank: under FSDP each forward is a collective.
    for index in mine.tensor_split(-(-n // (runtime.world_size * batch_size))):
        inputs, labels, targets = data.batch(index.tolist())
        inputs, labels, targets = (t.to(runtime.device) for t in (inputs, labels, targets))
        with autocast_context(cfg.precision, runtime.device):
            loss, correct = stage_loss(model, inputs, labels, targets)
        totals += torch.tensor([float(loss) * targets.numel(), float(correct), targets.numel()], dtype=torch.float64)
    all_reduce_sum(totals, runtime)
    model.train(was_training)
    return {"eval_loss": float(totals[0] / totals[2]), "eval_acc": float(totals[1] / totals[2])}


def train(cfg: TrainConfig) -> dict:
    with launched(cfg.device) as runtime:
        return _train(cfg, runtime)


def _train(cfg: TrainConfig, runtime: Runtime) -> dict:
    check_options(cfg)
    check_output(cfg.out, flag="--out", what="a training run", is_ours=is_run_dir, overwrite=True)
    out, device = Path(cfg.out), runtime.device
    ckpt_dir = out / "checkpoint"
    coarse_map = CoarseMap.load(cfg.map) if cfg.map else None
    data = StageData(cfg.stage, CodeDataset(cfg.codes, coarse_map), coarse_map)
    eval_data = StageData(cfg.stage, CodeDataset(cfg.eval_codes, coarse_map), coarse_map) if cfg.eval_codes else None
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise CtfgenError(f"unknown --lr-schedule {cfg.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    if cfg.batch_size % (runtime.world_size * cfg.grad_accum):
        raise CtfgenError(f"--batch-size {cfg.batch_size} must divide evenly into {runtime.world_size} processes "
                          f"x {cfg.grad_accum} accumulation steps")
    if eval_data is not None and min(cfg.eval_items, len(eval_data.codes)) < runtime.world_size:
        raise CtfgenError(f"--eval-items must be at least the number of processes ({runtime.world_size})")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, data).to(device)
    train_model = wrap_for_training(model, cfg, runtime)  # FSDP shards `model` in place: wrap before the optimizer
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    # The EMA has the layout of the weights: sharded like them under FSDP (the update is elementwise).
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if cfg.ema else None
    start_step = 0
    if cfg.resume:
        state, ema = load_full_state(ckpt_dir, model, optimizer, ema)
        start_step = int(state["step"])
        restore_rng(state["rng"][min(runtime.rank, len(state["rng"]) - 1)])
    else:
        if runtime.is_main and (ckpt_dir / "train_state.pt").exists():
            raise CtfgenError(f"{ckpt_dir} already holds a run; pass --resume to continue it or choose another --out")
        torch.manual_seed(cfg.seed * 1000 + runtime.rank + 1)  # dropout masks differ between ranks
    if start_step >= cfg.steps:
        raise CtfgenError(f"the run in {cfg.out} already reached step {start_step} of {cfg.steps}; raise --steps")

    sampler = StepBatchSampler(len(data.codes), cfg.batch_size, seed=cfg.seed, rank=runtime.rank,
                               world_size=runtime.world_size)
    n_views = data.codes.manifest["views"]
    if cfg.views:
        if not 1 <= cfg.views <= n_views:
            raise CtfgenError(f"--views {cfg.views}: {cfg.codes} stores {n_views} view(s) of each image")
        n_views = cfg.views
    metrics_file = out / "metrics.jsonl"
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    model_config = model.config.to_dict()

    def save(step: int, snapshot: bool = False):
        rng = [capture_rng()]
        if runtime.distributed:
            gathered = [None] * runtime.world_size
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        full = full_state(model, optimizer, ema, runtime)  # every rank takes part; rank 0 gets it
        if runtime.is_main:
            weights, state = full
            # What model.save_pretrained writes, with the full weights (its state_dict() is sharded under FSDP).
            config = {"kind": model.checkpoint_kind, "model": model_config, "train": asdict(cfg), "step": step,
                      "stage": cfg.stage}
            save_checkpoint(ckpt_dir, config, weights, train_state=state | {"step": step, "rng": rng})
            if snapshot:  # weights only: for scoring the run's progress afterwards, not for resuming
                save_checkpoint(out / "snapshots" / f"step_{step:07d}", config, weights)
        barrier(runtime)

    stop = StopFlag()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.stage, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and runtime.is_main))
    model.train()
    tokens_per_step = cfg.batch_size * data.block_size
    last, tic, step = {}, time.perf_counter(), start_step
    for step in range(start_step, cfg.steps):
        batch = sampler.global_indices(step)
        views = torch.randint(n_views, (len(batch),), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
        local = sampler.local_slice()
        index, views = batch[local], views[local]
        lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [tuple(t.to(device) for t in data.batch(micro_index.tolist(), micro_views))
                         for micro_index, micro_views in zip(index.chunk(cfg.grad_accum), views.chunk(cfg.grad_accum))]
        total_loss, grad_norm = train_step(train_model, model, optimizer, micro_batches, cfg, device)
        if ema is not None:
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    ema[name].lerp_(value.float(), 1 - cfg.ema)

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = float(all_reduce_sum(total_loss.clone(), runtime)) / runtime.world_size
            elapsed = time.perf_counter() - tic
            last = {"step": step + 1, "loss": mean_loss, "grad_norm": float(grad_norm), "lr": lr,
                    "tokens_per_s": tokens_per_step * cfg.log_every / elapsed}
            tic = time.perf_counter()
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if eval_data is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            last |= {"step": step + 1, **held_out_metrics(model, eval_data, cfg, runtime)}  # uncompiled, unwrapped
        if last.get("step") == step + 1 and runtime.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(last) + "\n")
        bar.update(1)
        stop_now = stop.raised
        if runtime.distributed:
            stop_now = bool(all_reduce_sum(torch.tensor(float(stop_now)), runtime) > 0)
        snapshot = cfg.snapshot_every > 0 and (step + 1) % cfg.snapshot_every == 0
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop_now or snapshot:
            save(step + 1, snapshot)
        if stop_now:
            break
    bar.close()
    stop.restore()
    return {**last, "step": step + 1, "checkpoint": str(ckpt_dir), "config": model_config}


def wrap_for_training(model, cfg: TrainConfig, runtime: Runtime):
    """The module to train through: `model` itself in a single process (with or without --fsdp), DDP around it
    under torchrun, or with --fsdp `model` sharded in place by FSDP2, one group per TransformerBlock and one for
    the rest. Build the optimizer from `model.parameters()` after this."""
    if not runtime.distributed:
        return model
    if not cfg.fsdp:
        return DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


# Checkpoints hold full tensors and number the optimizer's parameters as `optimizer.state_dict()` does,
# whether the run is sharded (FSDP) or not, so either kind of run resumes the other's checkpoints.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's order, i.e. `optimizer.state_dict()`'s numbering."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekey(optim_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through `key` (numbers <-> names)."""
    return {"state": {key[k]: v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in optim_state["param_groups"]]}


def full_state(model, optimizer, ema: dict | None, runtime: Runtime) -> tuple[dict, dict] | None:
    """(weights, {"optimizer", "ema"}) as full CPU tensors on rank 0, None on the other ranks. Every rank must
    call it: under FSDP it gathers the shards."""
    weights = get_model_state_dict(model, options=FULL_STATE)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)  # keyed by parameter name
    if ema is not None:
        ema = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in ema.items()}
    if not runtime.is_main:
        return None
    numbers = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return weights, {"optimizer": _rekey(optim_state, numbers)} | ({"ema": ema} if ema is not None else {})


def load_full_state(ckpt_dir: Path, model, optimizer, ema: dict | None) -> tuple[dict, dict | None]:
    """Load a checkpoint written by `full_state` into the (sharded or plain) model, optimizer and EMA; returns
    the training state and the EMA (kept fresh when the checkpoint has none)."""
    state = load_train_state(ckpt_dir)
    check_weight_shapes(model, ckpt_dir, resuming=True)
    check_optimizer_state(state["optimizer"], optimizer, ckpt_dir)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_weights(ckpt_dir), options=options)
    names = dict(enumerate(_param_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, _rekey(state["optimizer"], names), options=options)
    if ema is not None and "ema" in state:
        ema = {k: distribute_tensor(state["ema"][k].to(v.device), v.device_mesh, v.placements)
               if isinstance(v, DTensor) else state["ema"][k].to(v.device) for k, v in ema.items()}
    return state, ema
