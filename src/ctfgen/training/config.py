"""A training run's settings (`TrainConfig`), free of torch: `ctfgen train` makes its flags from these fields, and
`ctfgen --help` answers without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctfgen.choices import PRECISIONS
from ctfgen.models.config import GPT_PRESETS
from ctfgen.training.schedule import LR_SCHEDULES
from ctfgen.validation import DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, RATE, SEED, Real, check_fields

STAGES = ("baseline", "stage1", "stage2")


@dataclass
class TrainConfig:
    """One training run. `ctfgen train` takes its flags from these fields: names, types, defaults, choices and
    help lines (metadata["help"], metadata["choices"])."""

    stage: str = field(metadata={"help": "which model: the baseline GPT over fine tokens, the stage-1 GPT over coarse "
                                         "labels, or the stage-2 refiner", "choices": STAGES})
    codes: str = field(metadata={"help": "training codes from `ctfgen extract`"})
    out: str = field(metadata={"help": "run directory (checkpoint/, metrics.jsonl)"})
    model: str = field(default="GPT-S", metadata={"help": "model preset", "choices": tuple(GPT_PRESETS)})
    n_layer: int | None = field(default=None, metadata={
        "help": "transformer blocks instead of the preset's (e.g. a stage 1 as costly per token as the baseline)",
        "rule": POSITIVE})
    map: str | None = field(default=None, metadata={"help": "coarse map from `ctfgen cluster` (stage1, stage2)"})
    eval_codes: str | None = field(default=None, metadata={
        "help": "held-out codes for loss/accuracy every --eval-every steps"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps", "rule": POSITIVE})
    batch_size: int = field(default=64, metadata={"help": "sequences per step, over all processes and accumulation "
                                                          "steps", "rule": POSITIVE})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation: micro-batches per step",
                                                 "rule": POSITIVE})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (after warm-up)", "rule": RATE})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay of the weight matrices",
                                                        "rule": Real(0)})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "rule": DECAY})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "rule": DECAY})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this", "rule": RATE})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps", "rule": NON_NEGATIVE})
    lr_schedule: str = field(default="constant", metadata={
        "help": "after warm-up: constant (LlamaGen) or cosine decay to lr / 10 at the last step",
        "choices": LR_SCHEDULES})
    class_dropout: float = field(default=0.1, metadata={
        "help": "probability of dropping the class label (trains the unconditional side of classifier-free guidance)",
        "rule": PROBABILITY})
    dropout: float | None = field(default=None, metadata={
        "help": "token, residual and FFN dropout instead of the preset's (LlamaGen: 0.1)", "rule": DECAY})
    reveal: bool = field(default=False, metadata={
        "help": "stage2: a refiner that also reads revealed fine tokens, trained with a random share of each grid "
                "revealed (MaskGIT's cosine schedule), for sampling in several steps (--stage2-steps)"})
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights; 0 disables", "rule": DECAY})
    eval_every: int = field(default=500, metadata={"help": "held-out loss/accuracy every N steps (with --eval-codes)",
                                                   "rule": POSITIVE})
    eval_items: int = field(default=2000, metadata={"help": "held-out items scored each time", "rule": POSITIVE})
    ckpt_every: int = field(default=500, metadata={"help": "checkpoint every N steps (also at the end and on "
                                                           "SIGTERM/SIGINT)", "rule": POSITIVE})
    snapshot_every: int = field(default=0, metadata={
        "help": "also keep the weights of every N-th step under snapshots/ (0: never)", "rule": NON_NEGATIVE})
    views: int = field(default=0, metadata={
        "help": "train on the first N stored views of each image (1: without the mirrors); 0: all",
        "rule": NON_NEGATIVE})
    log_every: int = field(default=10, metadata={"help": "metrics to metrics.jsonl every N steps", "rule": POSITIVE})
    seed: int = field(default=0, metadata={"help": "initial weights, data order and dropout masks", "rule": SEED})
    precision: str = field(default="auto", metadata={
        "help": "auto: bf16 autocast on CUDA or bf16-capable CPUs, fp32 elsewhere (see ctfgen.backends.precision)",
        "choices": PRECISIONS})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N; under torchrun with cuda each "
                                                          "process takes its own GPU"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun, shard weights, gradients, optimizer state and EMA over the processes (FSDP2, per "
                "transformer block) instead of replicating them (DDP); for the large presets. A single process "
                "trains unsharded. Checkpoints are the same either way"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training step (~30 s once, then ~1.2x faster on a CPU)"})
    progress: bool = field(default=True, metadata={
        "help": "a progress bar on a terminal (in a log, a line at every tenth of the run either way)"})

    def __post_init__(self):
        check_fields(self)
