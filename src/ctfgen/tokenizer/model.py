"""The VQ image tokenizer, with LlamaGen's architecture and parameter names.

Compatible with FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`: a released
`vq_ds16_c2i.pt` loads with strict=True and computes the same codes and pixels. The quirks that
matter for that are kept on purpose and marked below.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.checkpoint import PretrainedMixin
from ctfgen.tokenizer.config import GROUPS, VQ_PRESETS, VQConfig

CHECKPOINT_KIND = "vq-tokenizer"
CODEBOOK_USED_LEN = 65536  # LlamaGen's usage buffer has this length whatever the codebook size


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)  # LlamaGen: eps 1e-6


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as LlamaGen
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LlamaGen/taming: asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, mult = cfg.ch, cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            lowest = level == len(mult) - 1
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, ch * m, cfg.dropout_p))
                block_in = ch * m
                if lowest:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(block_in))
            if not lowest:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = _middle(block_in, cfg.dropout_p)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, mult = cfg.ch, cfg.decoder_ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in, cfg.dropout_p)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):  # LlamaGen: one more block per level than the encoder
                block.res.append(ResnetBlock(block_in, ch * mult[level], cfg.dropout_p))
                block_in = ch * mult[level]
                if level == len(mult) - 1:
                    block.attn.append(AttnBlock(block_in))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # [B, D, h, w], straight-through
    indices: torch.Tensor  # [B, h, w]
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor
    latents: torch.Tensor  # [B*h*w, D] the (normalised) encoder outputs, detached


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup; with l2_norm both latents and codewords live on the unit sphere."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.beta, self.entropy_loss_ratio = cfg.commit_loss_beta, cfg.entropy_loss_ratio
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # Kept for state-dict compatibility with LlamaGen; usage is tracked by the training loop.
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))

    def codewords(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):  # argmin over bf16 distances picks wrong codes
            z = z.float().permute(0, 2, 3, 1)
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            e = self.codewords()
            flat = z.reshape(-1, self.e_dim)
            zero = z.new_zeros(())
            if self.training and self.entropy_loss_ratio > 0:  # needs every distance, with their gradients
                d = codeword_distances(flat, e)
                indices = d.argmin(1)
                entropy_loss = self.entropy_loss_ratio * entropy_loss_from_affinity(-d)
            else:
                indices, entropy_loss = nearest_codewords(flat.detach(), e.detach()), zero
            z_q = e[indices].view(z.shape)
            codebook_loss = (z_q - z.detach()).pow(2).mean() if self.training else zero
            commit_loss = self.beta * (z_q.detach() - z).pow(2).mean() if self.training else zero
            z_q = z + (z_q - z).detach()
        return QuantizerOutput(z_q.permute(0, 3, 1, 2), indices.view(z.shape[:-1]),
                               codebook_loss, commit_loss, entropy_loss, flat.detach())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] -> codewords [B, D, h, w]."""
        return self.codewords()[indices].permute(0, 3, 1, 2)


def codeword_distances(latents: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """The squared distance [latents, V] from every latent to every codeword, all at once."""
    return latents.pow(2).sum(1, keepdim=True) + codewords.pow(2).sum(1) - 2 * latents @ codewords.t()


def nearest_codewords(latents: torch.Tensor, codewords: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """The index of each latent's nearest codeword, argmin_j |e_j|^2 - 2 z.e_j (|z|^2 does not change it), `rows`
    latents at a time: with a large codebook the [latents, V] distances would not fit in the CPU's caches (at 16,384
    codewords of dimension 8, all at once took 5x as long as in chunks of 64)."""
    squared = codewords.pow(2).sum(1)
    return torch.cat([torch.addmm(squared, chunk, codewords.t(), alpha=-2).argmin(1) for chunk in latents.split(rows)])


def entropy_loss_from_affinity(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-token entropy minus codebook-average entropy (MaskGIT/LlamaGen): confident, diverse codes."""
    logits = affinity / temperature
    probs = logits.softmax(-1)
    sample_entropy = -(probs * F.log_softmax(logits + 1e-5, dim=-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_entropy - avg_entropy


@dataclass
class VQOutput:
    reconstruction: torch.Tensor
    quant: QuantizerOutput


class VQModel(PretrainedMixin, nn.Module):
    checkpoint_kind = CHECKPOINT_KIND
    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def codebook(self) -> torch.Tensor:
        """The codewords as the quantizer uses them (L2-normalised when configured): [V, D]."""
        return self.quantize.codewords()

    @property
    def codebook_weights(self) -> torch.Tensor:
        """The stored codebook weights [V, D], before normalisation (what coarse maps fingerprint)."""
        return self.quantize.embedding.weight.detach()

    @property
    def fingerprint(self) -> str:
        return codebook_fingerprint(self.codebook_weights)

    def quantize_images(self, images: torch.Tensor) -> QuantizerOutput:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> VQOutput:
        quant = self.quantize_images(images)
        return VQOutput(self.decode_latents(quant.z_q), quant)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> token grid LongTensor [B, H/f, W/f]."""
        return self.quantize_images(images).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h, w] -> images [B, 3, h*f, w*f] (roughly in [-1, 1])."""
        return self.decode_latents(self.quantize.lookup(indices))


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """A short hash of the stored codebook weights rounded to fp16, so that a training checkpoint
    and its fp16 export (the same tokenizer) agree."""
    rounded = codebook.detach().cpu().half().contiguous()
    digest = hashlib.sha256(rounded.numpy().tobytes() + str(tuple(rounded.shape)).encode()).hexdigest()
    return digest[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VQConfig", "VQ_PRESETS", "VQModel", "codebook_fingerprint", "count_parameters"]
