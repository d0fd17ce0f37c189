"""Loading LlamaGen's released class-conditional GPTs (`c2i_{B,L,XL}_*.pt`) into ctfgen's GPT.

The files are read with weights_only=True (nothing is unpickled); the parameter names are LlamaGen's own, so the
state dict loads with strict=True and the model computes LlamaGen's logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctfgen.errors import CtfgenError
from ctfgen.models.config import gpt_config
from ctfgen.models.gpt import GPT, drop_foreign_keys


def load_llamagen_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen `.pt` file (its "model" entry when there is one), read with
    weights_only=True, without the non-weight `freqs_cis` entry."""
    path = Path(path)
    if not path.is_file():
        raise CtfgenError(f"{path} does not exist; download the LlamaGen checkpoint or fix the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, or a pickle that would need code to load
        raise CtfgenError(f"cannot read {path} as a weights-only checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(checkpoint, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CtfgenError(f"{path} does not hold a state dict of tensors")
    return drop_foreign_keys(checkpoint)


def gpt_from_llamagen(path, preset: str = "GPT-B", block_size: int = 256, device="cpu", **overrides) -> GPT:
    """A released LlamaGen c2i GPT (`c2i_B_256.pt`, ...), in eval mode. The vocabulary and class count are read
    from the weights; the preset (head count) and block_size (256 for 256px, 576 for 384px with VQ-16) must be
    given because the file does not record them."""
    state_dict = load_llamagen_state_dict(path)
    try:
        vocab_size = state_dict["tok_embeddings.weight"].shape[0]
        num_classes = state_dict["cls_embedding.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise CtfgenError(f"{path} is not a LlamaGen class-conditional GPT checkpoint (no {e})") from None
    model = GPT(gpt_config(preset, vocab_size, block_size, num_classes, **overrides))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CtfgenError(f"{path} does not fit preset {preset} ({str(e).splitlines()[0]}); "
                          f"pass the preset it was trained with") from None
    return model.to(device).eval()
