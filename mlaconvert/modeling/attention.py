"""Self-attention of a Wan block, dense or latent (MLA), behind the one interface a KV cache needs.

Self-attention sees the world through these methods, which is all a KV cache needs (`angles`: the RoPE angles of
the tokens' positions, made once per forward, rope.Angles):
    entries(x)                    -> the per-token tensors a cache stores (dense: k, v; MLA: latent c, rope key r)
    rotate_entries(e, angles)     -> the same, rotated once at write when positions stay fixed (dense only)
    keys_values(entries, angles)  -> per-head K, V (rotated at the positions the cache assigns)
    queries(x, angles)            -> per-head Q
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.layers import Linear, RMSNorm
from mlaconvert.modeling.masks import Mask, attention
from mlaconvert.modeling.rope import Angles, Rotary, leading_rope_pairs


class LayerKV(Protocol):
    """One layer's view of a KV cache for the current forward."""

    # True when a cached token keeps its RoPE position for as long as it is cached (absolute positions): an
    # attention may then store its keys rotated once, at write, instead of rotating the whole window each forward.
    fixed_positions: bool

    def extend(self, entries: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Angles]:
        """Return (cached + new entries, the RoPE angles of their positions); store the new ones if this forward commits."""
        ...


class Attention(nn.Module):
    """Shared forward of dense and latent self-attention; subclasses define what is cached and how."""

    num_heads: int
    head_dim: int
    o: Linear
    rotates_at_write = False  # whether `rotate_entries` can put the rotation into the cached entries

    def entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def rotate_entries(self, entries: tuple[torch.Tensor, ...], angles: Angles) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def keys_values(
        self, entries: tuple[torch.Tensor, ...], angles: Angles, rotated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values per head; `rotated`: the entries went through `rotate_entries` already."""
        raise NotImplementedError

    def queries(self, x: torch.Tensor, angles: Angles) -> torch.Tensor:
        raise NotImplementedError

    def cache_widths(self) -> tuple[int, ...]:
        """Width of each cached entry per token, in the order `entries` returns them."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        angles: Angles,
        past: LayerKV | None = None,
        mask: Mask | None = None,
    ) -> torch.Tensor:
        """x (B, L, dim); angles: of the L tokens' positions; past: the cache's view, whose entries come first."""
        entries = self.entries(x)
        kv_angles, rotated = angles, False
        if past is not None:
            rotated = past.fixed_positions and self.rotates_at_write
            if rotated:
                entries = self.rotate_entries(entries, angles)
            entries, kv_angles = past.extend(entries)
        q = self.queries(x, angles)
        k, v = self.keys_values(entries, kv_angles, rotated)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = attention(q, k, v, mask)
        return self.o(out.transpose(1, 2).flatten(2))


class DenseSelfAttention(Attention):
    """Wan's self-attention: full-width RMS-normed q/k, 3D RoPE on every pair; caches k (normed, unrotated) and v."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, config.eps) if config.qk_norm else nn.Identity()
        self.rotary = Rotary.full(config.head_dim)

    def cache_widths(self) -> tuple[int, ...]:
        return (self.num_heads * self.head_dim,) * 2

    # With absolute positions the cache keeps keys rotated, as Self-Forcing's sampler does: each key is rotated
    # once instead of the whole window at every forward. The rotation runs in float32 and returns the entries'
    # dtype either way, so both orders give the same keys bit for bit.
    rotates_at_write = True

    def entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.norm_k(self.k(x)), self.v(x)

    def rotate_entries(self, entries: tuple[torch.Tensor, ...], angles: Angles) -> tuple[torch.Tensor, ...]:
        k, v = entries
        rotated = self.rotary.apply(k.unflatten(-1, (self.num_heads, self.head_dim)), *self.rotary.cos_sin(angles))
        return rotated.flatten(-2), v

    def keys_values(
        self, entries: tuple[torch.Tensor, ...], angles: Angles, rotated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (e.unflatten(-1, (self.num_heads, self.head_dim)) for e in entries)
        return (k if rotated else self.rotary.apply(k, *self.rotary.cos_sin(angles))), v

    def queries(self, x: torch.Tensor, angles: Angles) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.rotary.apply(q, *self.rotary.cos_sin(angles))


class LatentSelfAttention(Attention):
    """Multi-head latent attention with a shared, decoupled 3D-RoPE key (DESIGN §3).

    Per token it caches the content latent c = kv_down x (dc values) and the rope key r = k_rope x + b (rope_dim
    values, unrotated). Head h attends with q^h = [q_C^h ; rot(mix^h q_R^h)] and k^h = [s k_up(c)^h ; s rot(r)],
    v^h = v_up(c)^h. The per-token key scale s is Wan's key RMS norm evaluated on the pre-norm key the latent
    stands for: the content part plus, for the rope key, the quadratic form `k_rope_norm` (one 2x2 per pair)
    that gives the energy of all heads' rope dims it replaces — exact whenever the heads agree up to a complex
    scale. Wan's elementwise key-norm weight is inside r for rope dims and on the query side (norm_q) for
    content dims, where it has the same effect on every score.
    """

    def __init__(self, config: WanConfig, layer: int):
        super().__init__()
        mla = config.mla
        assert mla is not None
        dim, dc, dr = config.dim, mla.dc[layer], mla.rope_dim
        self.num_heads, self.head_dim, self.nope_dim, self.rope_dim = config.num_heads, config.head_dim, mla.nope_dim, dr
        self.eps = config.eps
        if mla.q_rank:
            self.q_down = Linear(dim, mla.q_rank, bias=False)
            self.q_up = Linear(mla.q_rank, dim)
        else:
            self.q = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.q_rope_mix = nn.Parameter(torch.eye(2).repeat(self.num_heads, dr // 2, 1, 1))
        self.kv_down = Linear(dim, dc, bias=False)
        self.k_up = Linear(dc, self.num_heads * self.nope_dim)
        self.v_up = Linear(dc, dim)
        self.k_rope = Linear(dim, dr)
        self.k_rope_norm = nn.Parameter(torch.eye(2).repeat(dr // 2, 1, 1) * self.num_heads)
        self.o = Linear(dim, dim)
        rope_pairs = mla.rope_pairs[layer] if mla.rope_pairs else leading_rope_pairs(config.head_dim, dr)
        self.rotary = Rotary([p for axis in rope_pairs for p in axis], config.head_dim)

    def cache_widths(self) -> tuple[int, ...]:
        return self.kv_down.out_features, self.rope_dim

    @torch.no_grad()
    def project_key_form(self) -> None:
        """Move `k_rope_norm` to the nearest (Frobenius) positive semi-definite form: symmetrise, clamp the
        eigenvalues at 0. An energy must not go negative — its square root would be NaN — and an optimizer
        step knows nothing of that; projecting after each step keeps the stored 2x2 form (the export format)."""
        form = self.k_rope_norm
        # Sharded (FSDP2), each process projects its own rows: every 2x2 form is projected on its own.
        form = form.to_local() if hasattr(form, "to_local") else form
        values, vectors = torch.linalg.eigh(((form + form.transpose(-1, -2)) / 2).double())
        form.copy_((vectors * values.clamp_min(0).unsqueeze(-2)) @ vectors.transpose(-1, -2))

    def entries(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.kv_down(x), self.k_rope(x)

    def rope_energy(self, r: torch.Tensor) -> torch.Tensor:
        """The energy (..., 1) of all heads' rope dims that the rope key r stands for: one 2x2 form per pair."""
        a, b = r.float().unflatten(-1, (-1, 2)).unbind(-1)
        form = self.k_rope_norm.float()
        # Each pair's 2x2 form written out, for the reason `mix_pairs` gives (0.8 ms as an einsum on an H200).
        quadratic = a * a * form[:, 0, 0] + a * b * (form[:, 0, 1] + form[:, 1, 0]) + b * b * form[:, 1, 1]
        return quadratic.sum(-1, keepdim=True)

    def key_scale(self, k_c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The per-token key scale s (..., 1) from the content key k_up(c) and the rope key r."""
        # The norm is reduced in float32 without a float32 copy of the whole window's content keys.
        norm_dtype = torch.promote_types(k_c.dtype, torch.float32)
        energy = torch.linalg.vector_norm(k_c, dim=-1, keepdim=True, dtype=norm_dtype).pow(2) + self.rope_energy(r)
        return torch.rsqrt(energy / (self.num_heads * self.head_dim) + self.eps)

    def head_keys(self, entries: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's key, unrotated and before the per-token scale, (..., H, head_dim) = [k_up(c)^h ; mix^hᵀ r],
        and that scale s (..., 1).

        The query's rope mix is a complex scale per pair, which commutes with the rotation, so moved to the key
        side it gives the key each head's scores see: the pre-norm dense key this layer stands for, except for
        Wan's key-norm weight (inside r on the rope dims, in norm_q on the content dims).
        """
        c, r = entries
        k_c = self.k_up(c)
        k_r = mix_pairs(r.float().unflatten(-1, (-1, 2)).unsqueeze(-3), self.q_rope_mix.float().transpose(-1, -2)).flatten(-2)
        k = torch.cat([k_c.float().unflatten(-1, (self.num_heads, self.nope_dim)), k_r], dim=-1)
        return k, self.key_scale(k_c, r)

    def keys_values(
        self, entries: tuple[torch.Tensor, ...], angles: Angles, rotated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The rope key stays unrotated in the cache: its per-token scale is a quadratic form of the unrotated r.
        if rotated:
            raise ValueError("latent attention caches its rope key unrotated (rotates_at_write is False)")
        c, r = entries
        k_c = self.k_up(c)
        scale = self.key_scale(k_c, r)
        k_c = (k_c * scale.to(k_c.dtype)).unflatten(-1, (self.num_heads, self.nope_dim))
        k_r = self.rotary.apply((r.float() * scale).to(k_c.dtype), *self.rotary.cos_sin(angles))
        k = torch.cat([k_c, k_r.unsqueeze(-2).expand(*k_c.shape[:-1], self.rope_dim)], dim=-1)
        v = self.v_up(c).unflatten(-1, (self.num_heads, self.head_dim))
        return k, v

    def queries(self, x: torch.Tensor, angles: Angles) -> torch.Tensor:
        q = self.q_up(self.q_down(x)) if hasattr(self, "q_down") else self.q(x)
        q = self.norm_q(q).unflatten(-1, (self.num_heads, self.head_dim))
        q_c, q_r = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_r = mix_pairs(q_r.float().unflatten(-1, (-1, 2)), self.q_rope_mix.float()).flatten(-2)
        return torch.cat([q_c, self.rotary.apply(q_r, *self.rotary.cos_sin(angles)).to(q_c.dtype)], dim=-1)


def mix_pairs(pairs: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """out_i = sum_j mix[..., i, j] x_j for each pair x (..., 2), with mix (..., 2, 2) broadcast over the leading dims.

    Written out rather than as an einsum, which runs as a batched matrix product of width 2: a kernel of its own
    (1.3 ms of an MLA forward on an H200) where a compiled block fuses these four products into its neighbours."""
    a, b = pairs.unbind(-1)
    return torch.stack((mix[..., 0, 0] * a + mix[..., 0, 1] * b, mix[..., 1, 0] * a + mix[..., 1, 1] * b), dim=-1)
