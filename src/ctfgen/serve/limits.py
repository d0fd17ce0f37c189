"""What one request and the server may take (`ctfgen serve --max-*`), free of torch for the command's flags."""

from __future__ import annotations

from dataclasses import dataclass

from ctfgen.errors import CtfgenError
from ctfgen.sampling.params import whole_number


@dataclass(frozen=True)
class Limits:
    max_images: int = 16  # images one request may ask for (generated, or variations of a re-roll)
    max_queue: int = 32  # requests waiting for the sampler at once; one more is told the server is busy
    max_batch: int = 64  # images in one sampler call

    def __post_init__(self):
        for name in ("max_images", "max_queue", "max_batch"):
            whole_number(getattr(self, name), name, minimum=1)
        if self.max_images > self.max_batch:
            raise CtfgenError(f"max_images ({self.max_images}) cannot exceed max_batch ({self.max_batch}): a "
                              f"request is sampled in one call")
