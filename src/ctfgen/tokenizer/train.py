"""Training the VQ tokenizer: MSE reconstruction + codebook/commitment (+ entropy, + PatchGAN).

Dead codewords (unused over an interval) are restarted at encoder latents of the current batch:
with 4096 codes and 64 tokens per image, many codes would otherwise never be chosen.
Runs alone or under torchrun (DDP); the data order depends only on (seed, step), so `--resume`
continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ctfgen.backends.precision import autocast_context
from ctfgen.checkpoint import RESUME_FIX
from ctfgen.data.batches import StepBatchSampler
from ctfgen.data.datasets import collate_images, load_dataset
from ctfgen.errors import CtfgenError
from ctfgen.seeding import CODE_RESTARTS, derived_generator
from ctfgen.tokenizer.config import VQ_PRESETS, TokenizerTrainConfig, VQConfig
from ctfgen.tokenizer.discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss
from ctfgen.tokenizer.model import VQModel
from ctfgen.training.distributed import Runtime, all_reduce_sum, broadcast, run_launched
from ctfgen.training.run import TrainingRun
from ctfgen.training.schedule import learning_rate
from ctfgen.training.state import check_optimizer_state


def build_model(cfg: TokenizerTrainConfig) -> VQModel:
    if cfg.model not in VQ_PRESETS:
        raise CtfgenError(f"unknown tokenizer preset {cfg.model!r}; choose one of {', '.join(VQ_PRESETS)}")
    preset = VQ_PRESETS[cfg.model].to_dict()
    if cfg.codebook_size:
        preset["codebook_size"] = cfg.codebook_size
    preset["entropy_loss_ratio"] = cfg.entropy_loss_ratio
    return VQModel(VQConfig(**preset))


@torch.no_grad()
def restart_dead_codes(model: VQModel, usage: torch.Tensor, latents: torch.Tensor, optimizer,
                       runtime: Runtime, generator: torch.Generator) -> int:
    """Move codewords unused since the last restart onto random latents of this batch (rank 0's)."""
    dead = usage == 0
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    weight = model.quantize.embedding.weight
    picks = torch.randint(len(latents), (n_dead,), generator=generator)
    jitter = 1e-3 * torch.randn(n_dead, latents.shape[1], generator=generator).to(latents.device)
    new = F.normalize(latents[picks.to(latents.device)] + jitter, dim=-1)
    weight[dead] = broadcast(new.to(weight.dtype).contiguous(), runtime)
    for key in ("exp_avg", "exp_avg_sq"):  # stale Adam moments would drag the new codes back
        state = optimizer.state.get(weight, {})
        if key in state:
            state[key][dead] = 0
    return n_dead


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict | None:
    """The run of `cfg`, alone or as one of torchrun's processes: its last metrics and checkpoint on the main
    process, None on the others."""
    return run_launched(train_in, cfg)


def train_in(cfg: TokenizerTrainConfig, runtime: Runtime) -> dict:
    """The run of `cfg` on this process of `runtime` (all of it in a single process)."""
    run = TrainingRun(cfg, runtime, "tokenizer")
    torch.manual_seed(cfg.seed + runtime.rank)
    model = build_model(cfg).to(runtime.device)
    dataset = load_dataset(cfg.data, "train", data_dir=cfg.data_dir, image_size=cfg.image_size,
                           flip=cfg.data != "fmnist", skip_bad=cfg.skip_bad_images)
    disc = PatchDiscriminator().to(runtime.device) if cfg.gan_weight > 0 else None
    opt_args = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(model.parameters(), **opt_args)
    disc_optimizer = torch.optim.AdamW(disc.parameters(), **opt_args) if disc else None
    # Codeword usage since the last restart, counted by each process; a checkpoint keeps the sum over processes.
    usage = torch.zeros(model.config.codebook_size, device=runtime.device)
    saved = run.start(model, optimizer, extra_state=lambda: {
        "usage": all_reduce_sum(usage.clone(), runtime).cpu(), **({} if disc is None else {
            "discriminator": disc.state_dict(), "disc_optimizer": disc_optimizer.state_dict()})})
    if saved is not None and disc is not None:
        load_discriminator(disc, disc_optimizer, saved, run.checkpoint_dir)
    if saved is not None and runtime.is_main:  # the sum on one process: the restarts' all-reduce gives it back
        usage.copy_(saved_usage(saved, usage, run.checkpoint_dir))
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=run.start_step,
                               end_step=cfg.steps, rank=runtime.rank, world_size=runtime.world_size)
    # Its own generator: making the loader's iterator draws a seed, which from the global generator would shift the
    # random flips of a resumed run (restored just before) away from the uninterrupted run's.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_images, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    train_model = DDP(model, broadcast_buffers=False) if runtime.distributed else model
    train_disc = DDP(disc, broadcast_buffers=False) if disc and runtime.distributed else disc

    last = {}
    tic = time.perf_counter()
    with run:
        for step, (images, _, _) in enumerate(loader, start=run.start_step):
            images = images.to(runtime.device, non_blocking=True)
            lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps, "cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast_context(cfg.precision, runtime.device):
                out_vq = train_model(images)
            q = out_vq.quant
            reconstruction = out_vq.reconstruction.float()
            rec_loss = F.mse_loss(reconstruction, images)
            loss = rec_loss + q.codebook_loss + q.commit_loss + q.entropy_loss
            use_gan = disc is not None and step >= cfg.gan_start
            if use_gan:
                with autocast_context(cfg.precision, runtime.device):
                    loss = loss + cfg.gan_weight * generator_adv_loss(train_disc(reconstruction))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if use_gan:
                with autocast_context(cfg.precision, runtime.device):
                    d_loss = hinge_d_loss(train_disc(images), train_disc(reconstruction.detach()))
                disc_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_optimizer.step()

            usage += torch.bincount(q.indices.flatten(), minlength=len(usage))
            if cfg.restart_every and (step + 1) % cfg.restart_every == 0:
                all_reduce_sum(usage, runtime)
                # Seeded from (seed, step), as the data order: a resumed run restarts the same codewords.
                generator = derived_generator(cfg.seed, CODE_RESTARTS, step)
                n_restarted = restart_dead_codes(model, usage, q.latents, optimizer, runtime, generator)
                used_fraction = float((usage > 0).float().mean())
                usage.zero_()
                last["codebook_usage_window"] = used_fraction
                last["restarted"] = n_restarted

            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                with torch.no_grad():
                    mse = all_reduce_sum(rec_loss.detach().clone(), runtime) / runtime.world_size
                psnr = float(10 * torch.log10(4.0 / mse))  # images span 2 units: [-1, 1]
                elapsed = time.perf_counter() - tic
                last |= {"step": step + 1, "loss": float(loss.detach()), "rec_mse": float(mse), "psnr_batch": psnr,
                         "codebook_loss": float(q.codebook_loss.detach()), "commit_loss": float(q.commit_loss.detach()),
                         "lr": lr, "images_per_s": cfg.log_every * cfg.batch_size / elapsed}
                if use_gan:
                    last["d_loss"] = float(d_loss.detach())
                tic = time.perf_counter()
                run.log(last)
                run.show(psnr=f"{psnr:.2f}", usage=f"{last.get('codebook_usage_window', 0):.2f}")
            if run.end_step(step + 1):
                break
    return {**last, "step": step + 1, "checkpoint": str(run.checkpoint_dir)}


def saved_usage(saved: dict, usage: torch.Tensor, checkpoint_dir) -> torch.Tensor:
    """The codeword usage a checkpoint kept (zeros for one written before it kept any)."""
    value = saved.get("usage", torch.zeros_like(usage))
    if not isinstance(value, torch.Tensor) or value.shape != usage.shape:
        raise CtfgenError(f"{checkpoint_dir}: the saved codeword usage does not fit a codebook of {len(usage)}; "
                          f"{RESUME_FIX}")
    return value


def load_discriminator(disc: PatchDiscriminator, disc_optimizer, saved: dict, checkpoint_dir) -> None:
    """The discriminator and its optimizer state from a resumed run's training state."""
    if not isinstance(saved.get("discriminator"), dict) or not isinstance(saved.get("disc_optimizer"), dict):
        raise CtfgenError(f"{checkpoint_dir} was trained without a discriminator; resume it without --gan-weight")
    check_optimizer_state(saved["disc_optimizer"], disc_optimizer, checkpoint_dir)
    try:
        disc.load_state_dict(saved["discriminator"])
    except RuntimeError as e:
        first_line = str(e).splitlines()[0]
        raise CtfgenError(f"{checkpoint_dir}: the saved discriminator does not fit ({first_line})") from None
    disc_optimizer.load_state_dict(saved["disc_optimizer"])
