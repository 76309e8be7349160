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

The steps, each checkable on its own: `choose_rope_pairs` (P, α, s_p), `factor_content_value` (svd / asvd /
random), `fold_query` (permutation, norm_q, rope mix, low-rank query) and `rope_key_energy` (k_rope_norm);
`factorize_layer` composes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from mlaconvert.conversion.spectra import effective_rank
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.rope import axis_pairs, rope_quota


@dataclass
class RopeKey:
    """The shared rope key of the pairs P: rows s_p (R, dim+1, complex, bias last) and per-head factors α (R, H)."""

    pairs: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # P, per RoPE axis
    rows: torch.Tensor
    alpha: torch.Tensor
    energy_kept: float  # fraction of the pairs' key energy the rank-1 step keeps

    @property
    def flat(self) -> list[int]:
        """P axis by axis: the order of the rope dims in r and in the query."""
        return [p for axis in self.pairs for p in axis]

    def projection(self) -> dict[str, torch.Tensor]:
        """k_rope's weight and bias: each pair's complex row s_p as its real and imaginary rows."""
        real, imag = self.rows.real, self.rows.imag
        return {
            "k_rope.weight": torch.stack([real[:, :-1], imag[:, :-1]], dim=1).reshape(-1, real.shape[1] - 1),
            "k_rope.bias": torch.stack([real[:, -1], imag[:, -1]], dim=1).reshape(-1),
        }


@dataclass
class ContentValue:
    """The content/value latent: W_KV_down (dc, dim), W_K_up (N rows, dc), W_V_up (dim, dc)."""

    kv_down: torch.Tensor
    k_up: torch.Tensor
    v_up: torch.Tensor
    singular_values: torch.Tensor  # of the (weighted) balanced content joint matrix M, all of them
    key_scale: float


@dataclass
class LayerFactors:
    """The MLA weights of one layer (native names under `self_attn.`) and what the factorisation measured."""

    weights: Mapping[str, torch.Tensor]  # in memory, or read back from where convert spilled them
    rope_pairs: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    kv_singular_values: torch.Tensor  # of the (weighted) balanced content joint matrix M, all of them
    key_scale: float
    rope_energy_kept: float  # fraction of the chosen pairs' key energy the rank-1 step keeps


class Whitener(NamedTuple):
    """L with C = L Lᵀ for the inputs' (slightly regularised) second moment C, and L⁻¹."""

    root: torch.Tensor
    inverse: torch.Tensor


def whitener(second_moment: torch.Tensor, n: int) -> Whitener:
    """The Whitener of a second moment, regularised so that rank-deficient inputs still have a Cholesky factor."""
    c = second_moment.double()
    c = c + torch.eye(n, dtype=c.dtype, device=c.device) * (1e-6 * c.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(c)
    return Whitener(chol, torch.linalg.inv(chol))


def _svd(m: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (U and Vᵀ with their first `keep` columns and rows at least, every σ): directly where it
    is cheap (tests, small models); for Wan-size matrices from the eigenvectors of the n x n Gram MᵀM (0.47 s for a
    1536-wide Wan-1.3B layer on 2 CPU cores against 1.0 s for a float32 SVD). The Gram's eigenvalues carry rounding
    of n·eps·σ₁², so σ is resolved above ~sqrt(n·eps)·σ₁ (6e-7 σ₁ at n = 1536) with relative error ~eps·(σ₁/σ)²:
    1e-10 at 1e-3 σ₁, far below any dc a model is converted at; the rank-r product U Σ Vᵀ = M V_r V_rᵀ is exact to
    rounding."""
    m = m.double()
    if m.numel() <= 2**21:
        return torch.linalg.svd(m, full_matrices=False)
    gram = m.T @ m
    n = gram.shape[0]
    if keep is not None and keep < n // 2 and gram.device.type == "cpu":
        # Only the top `keep` eigenvectors are used: LAPACK's MRRR finds them without the others, and eigvalsh gives
        # every eigenvalue. For 704 of a 5120-wide (Wan-14B) Gram on 2 cores: 10 s + 4.5 s against 22 s for eigh.
        eigenvalues = torch.linalg.eigvalsh(gram).flip(0)
        _, top = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - keep, n - 1], driver="evr", check_finite=False)
        v = torch.from_numpy(np.ascontiguousarray(top[:, ::-1]))
    else:
        eigenvalues, v = torch.linalg.eigh(gram)
        eigenvalues, v = eigenvalues.flip(0), v.flip(1)
    sigma = eigenvalues.clamp(min=0).sqrt()
    # U = M V / σ where σ is resolved; a column of an unresolved σ is 0, so it adds nothing at any rank.
    resolved = eigenvalues > n * torch.finfo(m.dtype).eps * eigenvalues[0]
    cols = slice(None, v.shape[1] if keep is None else keep)
    u = (m @ v[:, cols]) / torch.where(resolved, sigma, 1.0)[cols] * resolved[cols]
    return u, torch.where(resolved, sigma, 0.0), v.T


def _truncate(
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int, x_whitener: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) = (Σ^½ Vᵀ, U Σ^½) at `rank` from the SVD of W (or of W L, un-whitened again: down L⁻¹)."""
    u, s, vh = svd
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    if x_whitener is not None:
        down = down @ torch.linalg.inv(x_whitener)
    return down, u[:, :rank] * root


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


def key_pair_matrices(w_aug: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A_p for every pair p, (pairs, H, cols): each head's two key rows of pair p as one complex row."""
    rows = w_aug.view(num_heads, -1, 2, w_aug.shape[1])
    return torch.complex(rows[:, :, 0], rows[:, :, 1]).transpose(0, 1)


def choose_rope_pairs(a: torch.Tensor, quota: tuple[int, int, int], whitener: Whitener | None = None) -> RopeKey:
    """P: per axis the `quota` pairs whose heads one shared complex row captures best (σ1² of A_p, or of A_p L
    for asvd), with that row and the heads' factors from the best rank-1 approximation α_p s_p.

    The rows of `a` must carry Wan's key-norm weight g_k: it acts between the norm and the rotation, so it cannot
    move to the query side for rotated dims and the rank-1 step must see the key as the score sees it.
    """
    num_heads = a.shape[1]
    b = a @ whitener.root.to(a.dtype) if whitener is not None else a
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    sigma1_sq = s[:, 0] ** 2
    chosen = tuple(
        tuple(sorted(sorted(axis, key=lambda p: -sigma1_sq[p].item())[:q]))
        for axis, q in zip(axis_pairs(2 * a.shape[0]), quota)
    )
    rope = [p for axis in chosen for p in axis]
    total_energy = (b[rope].abs() ** 2).sum()
    kept = float(sigma1_sq[rope].sum() / total_energy) if total_energy > 0 else 1.0
    # α = sqrt(H) u1 and s_p = σ1 v1ᴴ / sqrt(H), so Σ_h |α|² = H: the rope key counts once per head in the key norm.
    alpha = u[rope, :, 0] * math.sqrt(num_heads)
    rows = (s[rope, 0, None] / math.sqrt(num_heads)) * vh[rope, 0, :]
    if whitener is not None:
        rows = rows @ whitener.inverse.to(rows.dtype)
    return RopeKey(chosen, rows, alpha, kept)  # type: ignore[arg-type]


def random_rope_key(rope_key: RopeKey, a: torch.Tensor, generator: torch.Generator) -> RopeKey:
    """Random rows s_p (no bias) at a typical head's row norm of A_p for each chosen pair, and α = 1."""
    rope = rope_key.flat
    scale = (a[rope].abs() ** 2).mean(dim=1).sum(dim=1).sqrt()
    noise = torch.complex(*(torch.randn(len(rope), a.shape[2], generator=generator, dtype=torch.float64) for _ in range(2))).to(a.device)
    noise[:, -1] = 0
    rows = noise / noise.norm(dim=1, keepdim=True) * scale[:, None]
    return replace(rope_key, rows=rows, alpha=torch.ones(len(rope), a.shape[1], dtype=torch.complex128, device=a.device))


def content_joint_matrix(wk_n: torch.Tensor, wv: torch.Tensor, x_whitener: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """M = [s W_K[N rows] ; W_V], s giving both blocks the same Frobenius norm (of W L with a whitener)."""
    k_norm, v_norm = (wk_n.norm(), wv.norm()) if x_whitener is None else ((wk_n @ x_whitener).norm(), (wv @ x_whitener).norm())
    key_scale = float(v_norm / k_norm) if k_norm > 0 else 1.0
    return torch.cat([key_scale * wk_n, wv], dim=0), key_scale


def factor_content_value(
    wk_n: torch.Tensor,
    wv: torch.Tensor,
    dc: int | None,
    *,
    energy: float = 0.99,
    x_whitener: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ContentValue:
    """W_KV_down, W_K_up, W_V_up from the truncated SVD of M (svd), of M L un-whitened (asvd, x_whitener = L),
    or drawn at random (generator given). dc None: `auto_dc` of M's spectrum at `energy`."""
    m, key_scale = content_joint_matrix(wk_n, wv, x_whitener)
    svd = _svd(m if x_whitener is None else m @ x_whitener, keep=dc)
    dc = dc if dc is not None else auto_dc(svd[1], energy, wv.shape[1])
    if generator is not None:
        kv_down, k_up, v_up = _random_content_value(wk_n, wv, dc, generator)
    else:
        kv_down, up = _truncate(svd, dc, x_whitener)
        # s only balanced the SVD; dividing it out leaves the key W_K's own best approximation.
        k_up, v_up = up[: wk_n.shape[0]] / key_scale, up[wk_n.shape[0] :]
    return ContentValue(kv_down, k_up, v_up, svd[1], key_scale)


def _random_content_value(
    wk_n: torch.Tensor, wv: torch.Tensor, dc: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def gaussian(rows: int, cols: int, norm: torch.Tensor) -> torch.Tensor:
        # Each up-projected row keeps the dense row's mean norm when c has unit-variance entries.
        draw = torch.randn(rows, cols, generator=generator, dtype=torch.float64).to(wv.device)
        return draw * (norm / math.sqrt(max(rows, 1) * cols))

    kv_down = gaussian(dc, wv.shape[1], torch.tensor(math.sqrt(dc)))
    return kv_down, gaussian(wk_n.shape[0], dc, wk_n.norm()), gaussian(wv.shape[0], dc, wv.norm())


def rope_mix(alpha: torch.Tensor) -> torch.Tensor:
    """q_rope_mix (H, R, 2, 2): per head and pair the real 2x2 form of multiplying by conj(α_p^h)."""
    conj = alpha.conj().T
    c, d = conj.real, conj.imag
    return torch.stack([torch.stack([c, -d], dim=-1), torch.stack([d, c], dim=-1)], dim=-2)  # out_i = Σ_j mix[i, j] q_j


def fold_query(
    attn: dict[str, torch.Tensor],
    g_k: torch.Tensor,
    content: list[int],
    rope: list[int],
    alpha: torch.Tensor,
    *,
    q_rank: int | None = None,
    x_whitener: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({norm_q, q_rope_mix}, the query projection): each head's rows permuted to [content N ; rope P], g_k of
    the content dims moved into norm_q, conj(α) into the mix; low-rank (Eckart–Young, of W_q L for asvd) at
    q_rank."""
    num_heads = alpha.shape[1]
    head_dim = g_k.shape[0] // num_heads
    content_rows, query_rows = (_pair_rows(head_dim, num_heads, pairs) for pairs in (content, content + rope))
    g_q = attn.get("norm_q.weight", torch.ones_like(g_k)).double()
    norm_q = g_q.clone()
    norm_q[content_rows] = g_q[content_rows] * g_k[content_rows]
    folded = {"norm_q.weight": norm_q[query_rows], "q_rope_mix": rope_mix(alpha)}
    wq, bq = attn["q.weight"].double()[query_rows], attn["q.bias"].double()[query_rows]
    if not q_rank:
        return folded, {"q.weight": wq, "q.bias": bq}
    down, up = _truncate(_svd(wq if x_whitener is None else wq @ x_whitener, keep=q_rank), q_rank, x_whitener)
    return folded, {"q_down.weight": down, "q_up.weight": up, "q_up.bias": bq}


def rope_key_energy(
    wk_aug: torch.Tensor, g_k: torch.Tensor, rope_key: RopeKey, num_heads: int, *, whitener: Whitener | None = None, random: bool = False
) -> torch.Tensor:
    """k_rope_norm (R, 2, 2): per rope pair the form Q_p with r_pᵀ Q_p r_p ≈ the energy of all heads' pre-norm
    (before g_k) key dims of that pair; `wk_aug` = [W_K, b_K] without g_k."""
    rope = rope_key.flat
    head_dim = wk_aug.shape[0] // num_heads
    if random:
        # A random rope row stands for no head, so its form is the energy of what it reconstructs (each head holds
        # G_h^-1 r): fitting the dense heads' energy to a random direction raised the attention error on the
        # built-in model.
        g_rope = g_k[_pair_rows(head_dim, num_heads, rope)].view(num_heads, len(rope), 2)
        return torch.diag_embed((g_rope.abs().clamp_min(1e-6) ** -2).sum(0))
    rope_rows = torch.stack([rope_key.rows.real, rope_key.rows.imag], dim=1)
    head_rows = wk_aug.view(num_heads, head_dim // 2, 2, -1)[:, rope].transpose(0, 1)
    return key_energy_form(rope_rows, head_rows, whitener.root if whitener is not None else None)


def _check_layer_options(
    dim: int, head_dim: int, dc: int | None, rope_dim: int, q_rank: int | None, init: str, second_moment: torch.Tensor | None
) -> tuple[int, int, int]:
    """Refuse bad options before any SVD; the rope quota per axis."""
    if dc is not None and not 0 < dc <= dim:
        raise MlaconvertError(f"--dc {dc} is outside the rank budget 1..{dim} of the joint [W_K; W_V] (cols = dim)")
    quota = rope_quota(head_dim, rope_dim)
    if init == "asvd" and second_moment is None:
        raise MlaconvertError("asvd needs calibration statistics (second moment of the block inputs)")
    if q_rank and not 0 < q_rank <= dim:
        raise MlaconvertError(f"--q-rank {q_rank} is outside 1..{dim}")
    return quota


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
    dim = wk.shape[1]
    head_dim = dim // num_heads
    quota = _check_layer_options(dim, head_dim, dc, rope_dim, q_rank, init, second_moment)
    whiten = whitener(second_moment, dim + 1) if init == "asvd" and second_moment is not None else None
    x_whitener = whiten.root[:dim, :dim] if whiten else None  # the biases stay exact in the up projections
    g_k = attn.get("norm_k.weight", torch.ones(dim, device=wk.device)).double()
    wk_aug = torch.cat([wk, bk[:, None]], dim=1)
    a = key_pair_matrices(wk_aug * g_k[:, None], num_heads)
    rope_key = choose_rope_pairs(a, quota, whiten)
    content = [p for p in range(head_dim // 2) if p not in set(rope_key.flat)]
    content_rows = _pair_rows(head_dim, num_heads, content)
    rng = (generator or torch.Generator().manual_seed(0)) if init == "random" else None
    cv = factor_content_value(wk[content_rows], attn["v.weight"].double(), dc, energy=energy, x_whitener=x_whitener, generator=rng)
    if rng is not None:  # after the content draws: a seed's exports stay reproducible only with the draws in this order
        rope_key = random_rope_key(rope_key, a, rng)
    folded, query = fold_query(attn, g_k, content, rope_key.flat, rope_key.alpha, q_rank=q_rank, x_whitener=x_whitener)
    weights = {
        **folded,
        "kv_down.weight": cv.kv_down, "k_up.weight": cv.k_up, "k_up.bias": bk[content_rows],
        "v_up.weight": cv.v_up, "v_up.bias": attn["v.bias"].double(),
        **rope_key.projection(),
        "k_rope_norm": rope_key_energy(wk_aug, g_k, rope_key, num_heads, whitener=whiten, random=rng is not None),
        "o.weight": attn["o.weight"], "o.bias": attn["o.bias"],
        **query,
    }
    dtype = attn["k.weight"].dtype
    return LayerFactors(
        weights={k: v if k.startswith("o.") else v.to(dtype) for k, v in weights.items()},
        rope_pairs=rope_key.pairs,
        kv_singular_values=cv.singular_values.float().cpu(),
        key_scale=cv.key_scale,
        rope_energy_kept=rope_key.energy_kept,
    )
