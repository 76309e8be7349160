"""The Wan2.1 DiT in plain PyTorch, with dense or latent (MLA) self-attention (attention.py) behind one interface.

Parameter names are Wan's native ones, so a native state dict loads as is. Shapes, in the order data flows:

    latents (B, C, F, H, W) --patch_embedding--> tokens (B, L = F*h*w, dim), frame-major
    timestep (B,) or (B, F) --sinusoid, time_embedding--> e (B, F, dim) --time_projection--> e0 (B, F, 6, dim)
    text (B, text_len, text_dim) --text_embedding--> context (B, text_len, dim)
    blocks: x += self_attn(mod(norm1 x)) * gate; x += cross_attn(norm3 x, context); x += ffn(mod(norm2 x)) * gate
    head: modulated norm, linear, unpatchify -> flow prediction (B, C, F, H, W)

The residual stream and all modulation run in float32 as in Wan; linear layers run in the weights' dtype.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.attention import DenseSelfAttention, LatentSelfAttention, LayerKV
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.layers import Conv3d, LayerNorm, Linear, RMSNorm, sinusoid
from mlaconvert.modeling.masks import AttentionBackend, Mask, chunked_inputs
from mlaconvert.modeling.rope import Angles, grid_positions


class KVStep(Protocol):
    """What a cache hands the model for one forward: the queries' RoPE angles and per-layer views."""

    query_angles: Angles

    def layer(self, index: int) -> LayerKV: ...


class CrossAttention(nn.Module):
    """Attention from video tokens to the text tokens; no positions, nothing cached across chunks."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2)
        k = self.norm_k(self.k(context)).unflatten(-1, heads).transpose(1, 2)
        v = self.v(context).unflatten(-1, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


# Compiled forms of Block.forward one process may keep: a few models (teacher, student) times the
# specialisations `compile_blocks` lists.
COMPILED_VARIANTS = 64


class Block(nn.Module):
    def __init__(self, config: WanConfig, layer: int):
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.self_attn = LatentSelfAttention(config, layer) if config.mla else DenseSelfAttention(config)
        self.norm3 = LayerNorm(dim, config.eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        angles: Angles,
        past: LayerKV | None,
        mask: Mask | None,
    ) -> torch.Tensor:
        # e0 is per latent frame; x is modulated frame by frame through a (B, F, tokens_per_frame, dim) view.
        b, frames = e0.shape[:2]
        e = (self.modulation.float() + e0).unsqueeze(2).unbind(3)  # 6 x (B, F, 1, dim)

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return (h.view(b, frames, -1, h.shape[-1]) * (1 + scale) + shift).flatten(1, 2)

        def gated(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return (h.float().view(b, frames, -1, h.shape[-1]) * gate).flatten(1, 2)

        y = self.self_attn(modulate(self.norm1(x), e[0], e[1]), angles, past, mask)
        x = x + gated(y, e[2])
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn(modulate(self.norm2(x), e[3], e[4]))
        return x + gated(y, e[5])


class Head(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        out = config.out_dim * math.prod(config.patch_size)
        self.norm = LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = Linear(config.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, frames = e.shape[:2]
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(2).unbind(3)  # (B, F, 1, dim)
        h = (self.norm(x).view(b, frames, -1, x.shape[-1]) * (1 + scale) + shift).flatten(1, 2)
        return self.head(h)


class WanModel(nn.Module):
    """Wan2.1 text-to-video DiT; bidirectional, block-causal, or chunk-by-chunk against a KV cache."""

    def __init__(self, config: WanConfig, attention_backend: AttentionBackend = "auto"):
        super().__init__()
        if attention_backend not in get_args(AttentionBackend):
            raise ValueError(f"unknown attention backend {attention_backend!r}; use one of {get_args(AttentionBackend)}")
        self.config = config
        self.attention_backend = attention_backend
        dim = config.dim
        self.patch_embedding = Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(config.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.head = Head(config)
        self.gradient_checkpointing = False

    # The Hugging Face pair below is written out rather than inherited from huggingface_hub's ModelHubMixin: the
    # mixin downloads a repo snapshot and rebuilds the model from its own config dict, while `hub.load_source`
    # already resolves every SOURCE form (files inside repos, training .pt, diffusers layout, allow-patterns,
    # revisions, offline) and reads the native and export layouts that save_pretrained must write.
    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        config: WanConfig | str | None = None,
        head_dim: int = 128,
        attention_backend: AttentionBackend = "auto",
    ) -> WanModel:
        """A dense or MLA model from any SOURCE `hub.load_source` accepts: a Hub repo (optionally @revision, or a
        file inside it), a local folder (native, diffusers, an mlaconvert export), a checkpoint file, builtin:NAME.
        `config`/`head_dim` size a bare training .pt, which carries no config."""
        from mlaconvert.checkpoints.hub import load_source

        checkpoint = load_source(source, config=config, head_dim=head_dim, revision=revision)
        return load_model(checkpoint.config, checkpoint.state_dict, device, dtype, attention_backend)

    def save_pretrained(self, folder: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write `config.json` + safetensors so that `from_pretrained(folder)` (and every command) loads it back:
        a dense model in native Wan layout, an MLA model in the export layout (without the rank report and model
        card that `convert`/`finetune` add). Atomic; an existing folder is replaced only with `force`."""
        from mlaconvert.checkpoints.formats import save_native
        from mlaconvert.conversion.export import save_weights
        from mlaconvert.outputs import atomic_dir, write_json

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(Path(folder), force) as tmp:
            if self.config.is_mla:
                save_weights(state, tmp)
                write_json(tmp / "config.json", self.config.to_dict())
            else:
                save_native(self.config, state, tmp)
        return Path(folder)

    def compile_blocks(self) -> None:
        """torch.compile every block (dynamic shapes: the cached window grows, batches vary). Fuses the many
        small float32 modulation, norm and rotation ops that otherwise leave the GPU waiting on launches.

        Every block shares one compiled-code cache, Block.forward's. Sizes of 1 are specialised even under
        dynamic shapes, so a batch of 1 or more, a chunk of 1 frame or more, a window filling or full each
        take their own entry: more than torch's default limit of 8, past which the blocks would silently run
        uncompiled. The limit is raised to hold them, and the rope pairs' indices go to the device now rather
        than in the first compiled call, whose guard on them would fail at the second."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)
        device = next(self.parameters()).device
        for block in self.blocks:
            block.self_attn.rotary.index(device)
            block.compile(dynamic=True)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        *,
        first_frame: int = 0,
        chunk_frames: int | None = None,
        window: int | None = None,
        sink: int = 0,
        cache: KVStep | None = None,
        clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow prediction for `latents` (B, C, F, H, W).

        timestep: (B,) or per latent frame (B, F). first_frame: absolute index of the first latent frame (RoPE).
        chunk_frames: run block-causally, chunks of that many frames attending to themselves and earlier chunks.
        window: with chunk_frames, each chunk sees only the last `window` frames up to its own last one — what a
            sampler's cache of that window holds once it slides, `sink` first frames included; None = every
            earlier frame.
        cache: a KVStep from a cache (see cache.py); the frames then attend to what it holds plus themselves.
        clean: teacher forcing (needs chunk_frames). The clean clip runs alongside at t = 0 and each noisy chunk
            attends to the clean chunks before it and to itself — in one forward, what the cached rollout does
            chunk by chunk. Only the noisy frames' prediction is returned.
        """
        cfg = self.config
        b, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise MlaconvertError(
                f"latent size {frames}x{height}x{width} is not divisible by the patch size {pt}x{ph}x{pw}"
            )
        grid = (frames // pt, height // ph, width // pw)
        t = timestep.reshape(b, -1).expand(b, grid[0]) if timestep.dim() < 2 or timestep.shape[1] == 1 else timestep
        mask = None
        if cache is not None:
            angles = cache.query_angles
        else:
            positions = grid_positions(*grid, first_frame=first_frame, device=latents.device)
            if chunk_frames is not None:
                latents, t, positions, mask = chunked_inputs(
                    latents, t, positions, grid, first_frame, chunk_frames, window, sink, clean, self.attention_backend
                )
            elif clean is not None:
                raise MlaconvertError("teacher forcing (clean=...) needs chunk_frames")
            angles = Angles.at(positions, cfg.head_dim, cfg.rope_theta)

        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).float()
        e = self.time_embedding(sinusoid(t, cfg.freq_dim)).float()
        e0 = self.time_projection(e).float().unflatten(-1, (6, cfg.dim))
        context = self.text_embedding(text)

        for i, block in enumerate(self.blocks):
            past = cache.layer(i) if cache is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, angles, past, mask, use_reentrant=False)
            else:
                x = block(x, e0, context, angles, past, mask)

        out = self.head(x, e).float()
        if clean is not None:
            out = out[:, out.shape[1] // 2 :]
        return unpatchify(out, grid, cfg.patch_size, cfg.out_dim)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> torch.Tensor:
    """(B, L, prod(patch)*C) tokens -> (B, C, F, H, W); each token's features are ordered (pt, ph, pw, C)."""
    b = x.shape[0]
    f, h, w = grid
    x = x.reshape(b, f, h, w, *patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, f * patch[0], h * patch[1], w * patch[2])


def load_model(
    config: WanConfig,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attention_backend: AttentionBackend = "auto",
) -> WanModel:
    """Build the model for `config` and load `state_dict` strictly, with a one-line error on any mismatch."""
    with torch.device("meta"):
        model = WanModel(config, attention_backend)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_few(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        kind = "MLA" if config.mla else "dense"
        raise MlaconvertError(f"weights do not fit a {kind} Wan model of this config: " + "; ".join(parts))
    return model.to(device=device, dtype=dtype)


def _few(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more

