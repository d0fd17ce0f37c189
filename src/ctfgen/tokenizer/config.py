"""The tokenizer's settings, free of torch: the VQ model's shape (`VQConfig`, its presets) and a training run's
(`TokenizerTrainConfig`), from whose fields `ctfgen tokenizer train` makes its flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ctfgen.choices import PRECISIONS
from ctfgen.errors import CtfgenError
from ctfgen.validation import (
    DECAY,
    IMAGE_SIZE,
    MAX_VOCAB,
    MAX_WIDTH,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    RATE,
    SEED,
    Real,
    Whole,
    check_fields,
    ruled,
)

GROUPS = 32  # GroupNorm groups (LlamaGen): every feature width must be a multiple of this


@dataclass
class VQConfig:
    codebook_size: int = ruled(16384, Whole(1, MAX_VOCAB))
    codebook_embed_dim: int = ruled(8, Whole(1, MAX_WIDTH))
    codebook_l2_norm: bool = True
    commit_loss_beta: float = ruled(0.25, Real(0))
    entropy_loss_ratio: float = ruled(0.0, Real(0))
    ch: int = ruled(128, Whole(1, MAX_WIDTH))
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = ruled(2, Whole(1, 64))
    z_channels: int = ruled(256, Whole(1, MAX_WIDTH))
    dropout_p: float = ruled(0.0, PROBABILITY)

    def __post_init__(self):
        check_fields(self)
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if not 1 <= len(mult) <= 8 or any(not 1 <= m or self.ch * m > MAX_WIDTH for m in mult):
                raise CtfgenError(f"{name} must be 1 to 8 positive channel multipliers with ch x multiplier <= "
                                  f"{MAX_WIDTH}, got {mult}")
            if any(self.ch * m % GROUPS for m in mult):
                raise CtfgenError(f"ch {self.ch} x {name} {mult} must give multiples of {GROUPS} channels (GroupNorm)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


VQ_PRESETS = {
    # LlamaGen's VQ-16: 16x downsampling, 16384 x 8 codebook (72M parameters).
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),
    # CPU-sized for the bundled Fashion-MNIST: 4x downsampling, 32x32 -> 8x8 tokens, 4096 codes.
    "VQ-fmnist": VQConfig(codebook_size=4096, ch=32, encoder_ch_mult=[1, 1, 2], decoder_ch_mult=[1, 1, 2],
                          num_res_blocks=1, z_channels=64),
    # For tests only: seconds to train.
    "VQ-tiny": VQConfig(codebook_size=64, codebook_embed_dim=4, ch=32, encoder_ch_mult=[1, 1],
                        decoder_ch_mult=[1, 1], num_res_blocks=1, z_channels=32),
}


@dataclass
class TokenizerTrainConfig:
    """One tokenizer training run. `ctfgen tokenizer train` takes its flags from these fields (see
    ctfgen.training.train.TrainConfig)."""

    out: str = field(metadata={"help": "run directory (checkpoint/, metrics.jsonl)"})
    model: str = field(default="VQ-fmnist", metadata={"help": "model preset", "choices": tuple(VQ_PRESETS)})
    data: str = field(default="fmnist", metadata={"help": "'fmnist' (bundled) or an image folder in ImageNet layout"})
    data_dir: str | None = field(default=None, metadata={
        "help": "Fashion-MNIST IDX directory (default $CTFGEN_DATA or /usr/share/datasets/fashion-mnist)"})
    image_size: int = field(default=256, metadata={"help": "resize/crop size for image folders (Fashion-MNIST is "
                                                           "32x32)", "rule": IMAGE_SIZE})
    skip_bad_images: bool = field(default=False, metadata={"help": "skip unreadable images with a warning"})
    codebook_size: int | None = field(default=None, metadata={"help": "codewords, instead of the preset's",
                                                              "rule": Whole(1, MAX_VOCAB)})
    steps: int = field(default=2000, metadata={"help": "optimizer steps", "rule": POSITIVE})
    batch_size: int = field(default=128, metadata={"help": "images per step, over all processes", "rule": POSITIVE})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (cosine decay after warm-up)", "rule": RATE})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps",
                                                     "rule": NON_NEGATIVE})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "rule": Real(0)})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "rule": DECAY})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "rule": DECAY})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this", "rule": RATE})
    entropy_loss_ratio: float = field(default=0.0, metadata={
        "help": "weight of the entropy loss that spreads the codebook usage (0 = off)", "rule": Real(0)})
    gan_weight: float = field(default=0.0, metadata={"help": "weight of the PatchGAN loss; 0 disables the "
                                                             "discriminator", "rule": Real(0)})
    gan_start: int = field(default=1000, metadata={"help": "the step the GAN loss starts at", "rule": NON_NEGATIVE})
    restart_every: int = field(default=100, metadata={
        "help": "every N steps, restart the codewords unused since the last time at encoder latents (0 = never)",
        "rule": NON_NEGATIVE})
    ckpt_every: int = field(default=250, metadata={"help": "checkpoint every N steps (also at the end and on "
                                                           "SIGTERM/SIGINT)", "rule": POSITIVE})
    log_every: int = field(default=10, metadata={"help": "metrics to metrics.jsonl every N steps", "rule": POSITIVE})
    seed: int = field(default=0, metadata={"help": "initial weights, data order and codeword restarts", "rule": SEED})
    precision: str = field(default="auto", metadata={
        "help": "auto: bf16 autocast on CUDA or bf16-capable CPUs, fp32 elsewhere (see ctfgen.backends.precision)",
        "choices": PRECISIONS})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N; under torchrun with cuda each "
                                                          "process takes its own GPU"})
    num_workers: int = field(default=0, metadata={"help": "data loading processes (0: in the training process)",
                                                  "rule": NON_NEGATIVE})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    progress: bool = field(default=True, metadata={
        "help": "a progress bar on a terminal (in a log, a line at every tenth of the run either way)"})

    def __post_init__(self):
        check_fields(self)
