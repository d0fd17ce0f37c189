"""One training loop for every transformer stage.

    baseline  GPT over fine tokens (vocabulary V)           next-token cross-entropy
    stage1    GPT over coarse labels (vocabulary K)         next-token cross-entropy
    stage2    refiner: class + coarse grid -> fine tokens   per-position cross-entropy, one pass

LlamaGen's defaults (AdamW lr 1e-4, wd 0.05, betas 0.9/0.95, clip 1.0, class dropout 0.1), bf16
autocast, gradient accumulation, optional EMA, held-out loss/accuracy; the run's frame (`run.py`) keeps a JSONL
metrics log and atomic checkpoints every N steps and on SIGTERM/SIGINT. The data order, the flip view of every
item and all dropout masks depend only on (seed, step) and the saved RNG state, so `--resume`
continues exactly. Runs alone or under torchrun: DDP, or with --fsdp FSDP2 (parameters, gradients,
optimizer state and EMA sharded over the processes). Checkpoints always hold full tensors, so they
are the same with and without FSDP and with any number of processes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from ctfgen.backends.precision import autocast_context
from ctfgen.backends.training import attention_kernel
from ctfgen.clustering import CoarseMap
from ctfgen.data.batches import StepBatchSampler
from ctfgen.data.codes import CodeDataset
from ctfgen.errors import CtfgenError
from ctfgen.models.blocks import TransformerBlock
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT
from ctfgen.models.refiner import Refiner, refiner_config
from ctfgen.seeding import DROPOUT, VIEWS, derived_generator, derived_seed
from ctfgen.training.config import STAGES, TrainConfig
from ctfgen.training.distributed import Runtime, all_reduce_sum, run_launched
from ctfgen.training.run import TrainingRun
from ctfgen.training.schedule import LR_SCHEDULES, learning_rate


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
    if cfg.n_layer is not None:
        overrides["n_layer"] = cfg.n_layer
    shape = dict(block_size=data.block_size, num_classes=data.num_classes)
    if cfg.stage == "stage2":
        return Refiner(refiner_config(cfg.model, vocab_size=data.fine_vocab, coarse_vocab_size=data.input_vocab,
                                      fine_inputs=cfg.reveal, **shape, **overrides))
    if cfg.reveal:
        raise CtfgenError(f"--reveal is for --stage stage2 (the refiner), not {cfg.stage}")
    return GPT(gpt_config(cfg.model, vocab_size=data.target_vocab, **shape, **overrides))


def stage_loss(model, inputs, labels, targets):
    """Mean cross-entropy and number of correct top-1 predictions over every predicted position."""
    logits, loss = model(inputs, labels, targets)  # logits [B, T, vocab]
    return loss, (logits.argmax(-1) == targets).sum()


def gradient_sync(train_model, last_micro_step: bool):
    """Under DDP, all-reduce the gradients only on the last micro step of an optimizer step."""
    return nullcontext() if last_micro_step or not hasattr(train_model, "no_sync") else train_model.no_sync()


def step_micro_batches(data: StageData, sampler: StepBatchSampler, step: int, n_views: int, cfg: TrainConfig,
                       device: torch.device) -> list:
    """This process's share of step `step`'s batch as cfg.grad_accum micro-batches of (inputs, labels, targets) on
    `device`. The items and the stored view of each (the image or its mirror) depend only on (seed, step)."""
    batch = sampler.global_indices(step)
    views = torch.randint(n_views, (len(batch),), generator=derived_generator(cfg.seed, VIEWS, step))
    local = sampler.local_slice()
    index, views = batch[local], views[local]
    return [tuple(t.to(device) for t in data.batch(micro_index.tolist(), micro_views))
            for micro_index, micro_views in zip(index.chunk(cfg.grad_accum), views.chunk(cfg.grad_accum))]


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
    totals = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # NCCL reduces device tensors only
    mine = torch.arange(runtime.rank, n, runtime.world_size)
    # As many batches on every rank: under FSDP each forward is a collective.
    for index in mine.tensor_split(-(-n // (runtime.world_size * batch_size))):
        inputs, labels, targets = data.batch(index.tolist())
        inputs, labels, targets = (t.to(runtime.device) for t in (inputs, labels, targets))
        with autocast_context(cfg.precision, runtime.device):
            loss, correct = stage_loss(model, inputs, labels, targets)
        totals += torch.tensor([float(loss) * targets.numel(), float(correct), targets.numel()], dtype=torch.float64,
                               device=runtime.device)
    all_reduce_sum(totals, runtime)
    model.train(was_training)
    return {"eval_loss": float(totals[0] / totals[2]), "eval_acc": float(totals[1] / totals[2])}


def train(cfg: TrainConfig) -> dict | None:
    """The run of `cfg`, alone or as one of torchrun's processes: its last metrics and checkpoint on the main
    process, None on the others."""
    return run_launched(train_in, cfg)


def train_in(cfg: TrainConfig, runtime: Runtime) -> dict:
    """The run of `cfg` on this process of `runtime` (all of it in a single process)."""
    run = TrainingRun(cfg, runtime, cfg.stage, snapshot_every=cfg.snapshot_every)
    device = runtime.device
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
    n_views = data.codes.manifest["views"]
    if cfg.views:
        if not 1 <= cfg.views <= n_views:
            raise CtfgenError(f"--views {cfg.views}: {cfg.codes} stores {n_views} view(s) of each image")
        n_views = cfg.views
    sampler = StepBatchSampler(len(data.codes), cfg.batch_size, seed=cfg.seed, rank=runtime.rank,
                               world_size=runtime.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, data).to(device)
    train_model = wrap_for_training(model, cfg, runtime)  # FSDP shards `model` in place: wrap before the optimizer
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True)
    # The EMA has the layout of the weights: sharded like them under FSDP (the update is elementwise).
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if cfg.ema else None
    saved = run.start(model, optimizer, extra_state=lambda: {} if ema is None else {"ema": full_tensors(ema)})
    if saved is None:
        torch.manual_seed(derived_seed(cfg.seed, DROPOUT, runtime.rank))  # dropout masks differ between ranks
    elif ema is not None and "ema" in saved:
        ema = {k: load_like(saved["ema"][k], v) for k, v in ema.items()}

    model.train()
    tokens_per_step = cfg.batch_size * data.block_size
    last, tic = {}, time.perf_counter()
    with run:
        for step in range(run.start_step, cfg.steps):
            lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = step_micro_batches(data, sampler, step, n_views, cfg, device)
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
                run.show(loss=f"{mean_loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if eval_data is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                last |= {"step": step + 1, **held_out_metrics(model, eval_data, cfg, runtime)}  # uncompiled, unwrapped
            if last.get("step") == step + 1:
                run.log(last)
            if run.end_step(step + 1):
                break
    return {**last, "step": step + 1, "checkpoint": str(run.checkpoint_dir), "config": model.config.to_dict()}


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


def full_tensors(tensors: dict) -> dict:
    """Tensors (possibly FSDP shards) as full CPU tensors; every rank must call it: it gathers the shards."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in tensors.items()}


def load_like(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full saved tensor laid out as `like`: on its device, and sharded like it when it is an FSDP shard."""
    if isinstance(like, DTensor):
        return distribute_tensor(saved.to(like.device), like.device_mesh, like.placements)
    return saved.to(like.device)
