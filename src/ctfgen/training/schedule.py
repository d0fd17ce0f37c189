"""Learning-rate schedules shared by every training loop."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The rate of 0-based `step`: linear warm-up to `peak` over `warmup_steps`, then either constant
    (LlamaGen) or a cosine decay towards a tenth of the peak, reached at step `total_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))
