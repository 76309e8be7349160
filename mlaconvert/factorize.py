"""Turning one dense self-attention into latent attention: the math of DESIGN §3, layer by layer.

Notation for one layer: x is the (modulated) block input, W_K/W_V/b_K/b_V the dense key/value projections,
g_k Wan's elementwise key-norm weight. A head of width d has d/2 complex pairs; the pairs P that keep their
rotation move to the shared rope key, the rest N stay in the per-head content key.

* Content and value share one latent: a truncated SVD of the *content joint matrix* M = [s W_K[N rows] ; W_V]
  at rank dc — the content pairs' key rows only, unlike the rank report's full joint matrix [s W_K; W_V] of
  `analyze`, whose balance s is taken over every key row. The scale s here only
  balances the two blocks (equal Frobenius norms) so neither dominates the SVD; it is divided out of k_up again,
  so the model's key is W_K's own best approximation. With calibration (asvd) the SVD is of M C^½, where
  C = E[x xᵀ], and the result is un-whitened: it then minimises the error on real inputs, E|(M - M̂) x|².
* Rope key: for pair p the H heads' rows form a complex H x (dim+1) matrix A_p (bias as a last column). Its
  best rank-1 approximation α_p s_p gives the shared rope row s_p; α_p is normalised to Σ_h |α_p^h|² = H, so
  the rope key counts once per head in the key norm. Every head's query is multiplied by conj(α_p^h) (a
  2x2 real mix) — the product rotates like the key, so this commutes with RoPE. Exact when all heads agree up
  to a complex scale.
* Wan's key-norm weight g_k moves to the query for content dims (into norm_q); for rope dims it sits between
  the norm and the rotation, so it goes into the rank-1 step and r; the key norm then needs the energy of the
  pre-norm rope dims, a 2x2 quadratic form per pair (`k_rope_norm`): the least-squares fit over tokens of
  every head's energy in that pair (`key_energy_form`), which also counts, on average, the energy of the
  directions the shared rank-1 key drops when heads disagree.
* The query's rows are permuted per head to [content dims ; rope dims] so attention is a plain split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.rope import axis_pairs, rope_quota
from mlaconvert.spectra import effective_rank


@dataclass
class LayerFactors:
    """The MLA weights of one layer (native names under `self_attn.`) and what the factorisation measured."""

    weights: dict[str, torch.Tensor]
    rope_pairs: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    kv_singular_values: torch.Tensor  # of the (weighted) balanced content joint matrix M, all of them
    key_scale: float
    rope_energy_kept: float  # fraction of the chosen pairs' key energy the rank-1 step keeps


def _whitener(second_moment: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cholesky factor L of the (slightly regularised) second moment, and its inverse; None = unweighted."""
    if second_moment is None:
        return None
    c = second_moment.double()
    c = c + torch.eye(n, dtype=c.dtype, device=c.device) * (1e-6 * c.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(c)
    return chol, torch.linalg.inv(chol)


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64 where it is cheap (tests, small models); float32 for Wan-size matrices keeps 30 layers under a minute.
    dtype = torch.float64 if m.numel() <= 2**21 else torch.float32
    u, s, vh = torch.linalg.svd(m.to(dtype), full_matrices=False)
    return u.double(), s.double(), vh.double()


def auto_dc(sigma: torch.Tensor, energy: float, dim: int, multiple: int = 16) -> int:
    """Smallest multiple of `multiple` whose top singular values hold `energy` of Σσ² (at most dim)."""
    rank = effective_rank(sigma.double().cpu().numpy(), energy)
    return min(dim, max(multiple, math.ceil(rank / multiple) * multiple))


def _pair_rows(head_dim: int, heads: int, pairs: list[int]) -> torch.Tensor:
    """Row indices (per head, head-major) of the given pairs' two dims each."""
    dims = torch.tensor([[2 * p, 2 * p + 1] for p in pairs], dtype=torch.long).flatten()
    return (torch.arange(heads)[:, None] * head_dim + dims).flatten()


def key_energy_form(rope_rows: torch.Tensor, head_rows: torch.Tensor, whitener: torch.Tensor | None = None) -> torch.Tensor:
    """The 2x2 forms Q_p (R, 2, 2) with r_pᵀ Q_p r_p ≈ Σ_h |k_h,p|², least squares over tokens.

    rope_rows (R, 2, n): the rope key r_p = S_p x̃ of each kept pair. head_rows (R, H, 2, n): every head's
    pre-norm key rows K_h,p of that pair, whose energy x̃ᵀ T_p x̃ (T_p = Σ_h K_h,pᵀ K_h,p) the form stands for.
    With x̃ = L z (whitener L, C = L Lᵀ the inputs' second moment; identity = weight space) and z modelled as a
    standard Gaussian, the mean square error of D = S_pᵀ Q S_p - T_p over tokens is E[(zᵀ Lᵀ D L z)²] =
    2 |Lᵀ D L|_F² + (tr Lᵀ D L)²: a projection of T_p onto the span of S_p plus a term matching the mean energy,
    so the energy of the heads' directions the shared rank-1 key drops still counts on average. Its three
    unknowns solve the normal equations (2A + m mᵀ) q = 2b + m·tr N, all of 2x2 quantities of P = S_p L:
    G = P Pᵀ, A_ij = tr(E_i G E_j G), b_i = tr(E_i P N Pᵀ), m_i = tr(E_i G). Exact (zero residual) when every
    head's rows are a 2x2 map of S_p — heads that agree up to a complex scale. Clamped to the PSD cone.
    """
    p = rope_rows if whitener is None else rope_rows @ whitener
    k = head_rows if whitener is None else head_rows @ whitener
    basis = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]], [[0, 1], [1, 0]]], dtype=p.dtype, device=p.device)
    gram = p @ p.transpose(-1, -2)  # (R, 2, 2)
    kp = k @ p.unsqueeze(1).transpose(-1, -2)  # (R, H, 2, 2): K_h L Pᵀ
    projected = (kp.transpose(-1, -2) @ kp).sum(1)  # P N Pᵀ
    total = k.pow(2).sum((1, 2, 3))  # tr N
    eg = torch.einsum("iab,rbc->riac", basis, gram)  # E_i G
    a = torch.einsum("riab,rjba->rij", eg, eg)
    b = torch.einsum("iab,rba->ri", basis, projected)
    m = eg.diagonal(dim1=-2, dim2=-1).sum(-1)
    lhs = 2 * a + m[:, :, None] * m[:, None, :]
    q = (torch.linalg.pinv(lhs) @ (2 * b + m * total[:, None]).unsqueeze(-1)).squeeze(-1)
    form = torch.einsum("ri,iab->rab", q, basis)
    values, vectors = torch.linalg.eigh(form)
    return (vectors * values.clamp_min(0).unsqueeze(-2)) @ vectors.transpose(-1, -2)


def factorize_layer(
    attn: dict[str, torch.Tensor],
    *,
    num_heads: int,
    dc: int | None,
    rope_dim: int,
    q_rank: int | None = None,
    init: str = "svd",
    second_moment: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    energy: float = 0.99,
) -> LayerFactors:
    """MLA weights for one dense self-attention given as {'q.weight', 'q.bias', 'k.weight', ..., 'norm_k.weight'}.

    second_moment: E[x̃ x̃ᵀ] of the layer's input augmented with a constant 1, (dim+1)^2; required for asvd.
    dc None: the smallest multiple of 16 holding `energy` of the (weighted) joint spectrum.
    """
    wk, bk = attn["k.weight"].double(), attn["k.bias"].double()
    wv, bv = attn["v.weight"].double(), attn["v.bias"].double()
    dim = wk.shape[1]
    hd = dim // num_heads
    if dc is not None and not 0 < dc <= dim:
        raise MlaconvertError(f"--dc {dc} is outside the rank budget 1..{dim} of the joint [W_K; W_V] (cols = dim)")
    quota = rope_quota(hd, rope_dim)
    weighted = init == "asvd"
    if weighted and second_moment is None:
        raise MlaconvertError("asvd needs calibration statistics (second moment of the block inputs)")
    whiten = _whitener(second_moment, dim + 1) if weighted else None

    # Rope pairs: per axis the pairs whose heads are best captured by one shared complex row (σ1² kept). The
    # rows carry Wan's key-norm weight g_k: it acts between the norm and the rotation, so it cannot move to the
    # query side for rotated dims and the rank-1 step must see the key as the score sees it.
    g_k = attn.get("norm_k.weight", torch.ones(dim, device=wk.device)).double()
    g_q = attn.get("norm_q.weight", torch.ones(dim, device=wk.device)).double()
    wk_aug = torch.cat([wk, bk[:, None]], dim=1) * g_k[:, None]
    pair_rows = wk_aug.view(num_heads, hd // 2, 2, dim + 1)
    a_all = torch.complex(pair_rows[:, :, 0], pair_rows[:, :, 1]).transpose(0, 1)  # (pairs, H, dim+1)
    b_all = a_all @ whiten[0].to(a_all.dtype) if whiten else a_all
    u, s, vh = torch.linalg.svd(b_all, full_matrices=False)
    sigma1_sq = s[:, 0] ** 2
    chosen = tuple(
        tuple(sorted(sorted(axis, key=lambda p: -sigma1_sq[p].item())[:q]))
        for axis, q in zip(axis_pairs(hd), quota)
    )
    rope = [p for axis in chosen for p in axis]
    content = [p for p in range(hd // 2) if p not in set(rope)]
    total_energy = (b_all[rope].abs() ** 2).sum()
    rope_kept = float(sigma1_sq[rope].sum() / total_energy) if total_energy > 0 else 1.0

    # alpha = sqrt(H) u1, s_p = σ1 v1ᴴ / sqrt(H) (un-whitened): Σ_h |α|² = H.
    alpha = u[rope, :, 0] * math.sqrt(num_heads)  # (R, H)
    row = (s[rope, 0, None] / math.sqrt(num_heads)) * vh[rope, 0, :]  # (R, dim+1)
    if whiten:
        row = row @ whiten[1].to(row.dtype)

    # Content + value: joint truncated SVD of the balanced (and, for asvd, whitened) M. Only the x block of the
    # augmented whitener acts here: the biases stay exact in k_up/v_up.
    krows = _pair_rows(hd, num_heads, content)
    wk_n, bk_n = wk[krows], bk[krows]
    x_whitener = whiten[0][:dim, :dim] if whiten else None
    k_norm, v_norm = (wk_n.norm(), wv.norm()) if x_whitener is None else ((wk_n @ x_whitener).norm(), (wv @ x_whitener).norm())
    key_scale = float(v_norm / k_norm) if k_norm > 0 else 1.0
    m = torch.cat([key_scale * wk_n, wv], dim=0)
    u_m, sv, vh_m = _svd(m if x_whitener is None else m @ x_whitener)
    if dc is None:
        dc = auto_dc(sv, energy, dim)

    if init == "random":
        g = generator or torch.Generator().manual_seed(0)

        def gaussian(rows: int, cols: int, norm: torch.Tensor) -> torch.Tensor:
            # Each up-projected row keeps the dense row's mean norm when c has unit-variance entries.
            draw = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(wk.device)
            return draw * (norm / math.sqrt(max(rows, 1) * cols))

        kv_down = gaussian(dc, dim, torch.tensor(math.sqrt(dc)))
        k_up, v_up = gaussian(wk_n.shape[0], dc, wk_n.norm()), gaussian(dim, dc, wv.norm())
        rope_scale = (a_all[rope].abs() ** 2).mean(dim=1).sum(dim=1).sqrt()  # per pair: a typical head's row norm
        noise = torch.complex(*(torch.randn(len(rope), dim + 1, generator=g, dtype=torch.float64) for _ in range(2))).to(wk.device)
        noise[:, dim] = 0
        row = noise / noise.norm(dim=1, keepdim=True) * rope_scale[:, None]
        alpha = torch.ones(len(rope), num_heads, dtype=torch.complex128, device=wk.device)
    else:
        root = sv[:dc].sqrt()
        kv_down = root[:, None] * vh_m[:dc]
        if x_whitener is not None:
            kv_down = kv_down @ torch.linalg.inv(x_whitener)
        up = u_m[:, :dc] * root
        k_up, v_up = up[: wk_n.shape[0]] / key_scale, up[wk_n.shape[0] :]

    # Query: rows permuted to [content ; rope] per head; g_k moves here (norm_q for content, the mix for rope).
    qrows = torch.cat([
        (h * hd + torch.tensor([[2 * p, 2 * p + 1] for p in content + rope], dtype=torch.long).flatten())
        for h in range(num_heads)
    ]) if content else _pair_rows(hd, num_heads, rope)
    norm_q = g_q.clone()
    norm_q[krows] = g_q[krows] * g_k[krows]
    norm_q = norm_q[qrows]
    conj = alpha.conj().T  # (H, R): c + i d
    c, d = conj.real, conj.imag
    mix = torch.stack([torch.stack([c, -d], dim=-1), torch.stack([d, c], dim=-1)], dim=-2)  # out_i = Σ_j mix[i, j] q_j
    # Energy of the pre-norm rope dims of all heads (before g_k) as a quadratic form in r. A random rope row
    # stands for no head, so its form is the energy of what it reconstructs (each head holds G_h^-1 r): fitting
    # the dense heads' energy to a random direction raised the attention error on the built-in model.
    if init == "random":
        g_rope = g_k[_pair_rows(hd, num_heads, rope)].view(num_heads, len(rope), 2)
        rope_norm = torch.diag_embed((g_rope.abs().clamp_min(1e-6) ** -2).sum(0))
    else:
        rope_rows = torch.stack([row.real, row.imag], dim=1)  # (R, 2, dim+1)
        head_rows = torch.cat([wk, bk[:, None]], dim=1).view(num_heads, hd // 2, 2, dim + 1)[:, rope].transpose(0, 1)
        rope_norm = key_energy_form(rope_rows, head_rows, whiten[0] if whiten else None)

    dtype = attn["k.weight"].dtype
    weights = {
        "norm_q.weight": norm_q,
        "q_rope_mix": mix,
        "kv_down.weight": kv_down,
        "k_up.weight": k_up,
        "k_up.bias": bk_n,
        "v_up.weight": v_up,
        "v_up.bias": bv,
        "k_rope.weight": torch.stack([row.real[:, :dim], row.imag[:, :dim]], dim=1).reshape(rope_dim, dim),
        "k_rope.bias": torch.stack([row.real[:, dim], row.imag[:, dim]], dim=1).reshape(rope_dim),
        "k_rope_norm": rope_norm,
        "o.weight": attn["o.weight"],
        "o.bias": attn["o.bias"],
    }
    wq, bq = attn["q.weight"].double()[qrows], attn["q.bias"].double()[qrows]
    if q_rank:
        if q_rank <= 0 or q_rank > dim:
            raise MlaconvertError(f"--q-rank {q_rank} is outside 1..{dim}")
        uq, sq, vq = _svd(wq if x_whitener is None else wq @ x_whitener)
        down = sq[:q_rank].sqrt()[:, None] * vq[:q_rank]
        if x_whitener is not None:
            down = down @ torch.linalg.inv(x_whitener)
        weights.update({"q_down.weight": down, "q_up.weight": uq[:, :q_rank] * sq[:q_rank].sqrt(), "q_up.bias": bq})
    else:
        weights.update({"q.weight": wq, "q.bias": bq})
    weights = {k: v.to(dtype) if not k.startswith("o.") else v for k, v in weights.items()}
    return LayerFactors(
        weights=weights,
        rope_pairs=chosen,  # type: ignore[arg-type]
        kv_singular_values=sv.float().cpu(),
        key_scale=key_scale,
        rope_energy_kept=rope_kept,
    )
