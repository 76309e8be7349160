"""The linear algebra of rank analysis (DESIGN §4): singular spectra, effective rank, truncation error, utilisation.

For one layer this gives the singular values of W_K, W_V and the *full joint matrix* [s*W_K; W_V] (every key row,
s balancing the W_K and W_V blocks), the energy-based effective rank of a spectrum, and for a latent width dc the
energy kept and the relative Frobenius error of the best rank-dc approximation (Eckart–Young); for an MLA layer,
how much of its dc budget the factors and the cached latents use.

The full joint matrix is a model-level view, not the matrix `convert` truncates: convert factorises the *content
joint matrix* [s_N*W_K[N rows]; W_V] (factorize.py) — only the key rows of the pairs that stay in the content path
(the rope pairs go to the shared rope key), with its own balance s_N over those rows, and for asvd weighted by the
inputs' second moment. Its spectrum gives an export's `mla.spectral_prediction`, the error the svd init actually
has; the full joint matrix's figures are an upper bound on what a latent of width dc must hold.

Numbers only: rank.py turns them into the rank report (JSON, table, PNG) that analyze writes and every export carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from mlaconvert.devices import choose_device
from mlaconvert.errors import MlaconvertError

EXACT_ENTRIES = 2**21  # weights up to this size (tests, small models) get float64 spectra on any device


@dataclass(frozen=True)
class LayerSpectra:
    """Singular values (descending, float64, on the CPU) of one layer's key, value and joint matrices."""

    k: torch.Tensor
    v: torch.Tensor
    kv: torch.Tensor  # of the full joint matrix [key_scale * W_K; W_V], every key row
    key_scale: float


def key_scale(w_k: torch.Tensor, w_v: torch.Tensor) -> float:
    """The s that gives s*W_K the Frobenius norm of W_V.

    Wan RMS-normalises the key right after W_K, so any scale on W_K leaves the model unchanged: the joint
    spectrum of [s*W_K; W_V] means something only for a stated s, and balancing the blocks keeps either one
    from dominating the SVD that `convert` truncates.
    """
    norm_k = torch.linalg.vector_norm(w_k, dtype=torch.float64)
    norm_v = torch.linalg.vector_norm(w_v, dtype=torch.float64)
    if norm_k == 0 or norm_v == 0:  # nothing to balance against
        return 1.0
    return float(norm_v / norm_k)


def spectrum_dtype(numel: int, device: torch.device) -> torch.dtype:
    """float64, except for a large matrix on the CPU: there a 5120-wide (Wan-14B) layer's two Grams and three
    eigvalsh take 18 s in float64 and 7 s in float32, a convert's largest cost after the factorisation. In
    float32 the squared singular values carry errors of ~n*eps*σ_1² (5e-7 σ_1² measured on a random 5120-wide
    layer), far below the two decimals the report's effective ranks and errors at dc are read to."""
    return torch.float32 if device.type == "cpu" and numel > EXACT_ENTRIES else torch.float64


def layer_spectra(w_k: torch.Tensor, w_v: torch.Tensor, device: torch.device | None = None) -> LayerSpectra:
    """Spectra of W_K, W_V and [s*W_K; W_V] (both `out x in`, sharing the input dim) with s = key_scale."""
    if w_k.ndim != 2 or w_v.ndim != 2 or w_k.shape[1] != w_v.shape[1]:
        raise MlaconvertError(f"W_K {tuple(w_k.shape)} and W_V {tuple(w_v.shape)} must be matrices on the same input")
    s = key_scale(w_k, w_v)
    device = device or choose_device(None)
    dtype = spectrum_dtype(max(w_k.numel(), w_v.numel()), device)
    k = w_k.to(device, dtype)
    v = w_v.to(device, dtype)
    gram_k, gram_v = k.T @ k, v.T @ v
    # The joint Gram is a sum of the blocks' Grams, so the third spectrum costs no extra matmul.
    return LayerSpectra(
        k=_spectrum_from_gram(gram_k, min(k.shape)),
        v=_spectrum_from_gram(gram_v, min(v.shape)),
        kv=_spectrum_from_gram(s * s * gram_k + gram_v, min(k.shape[0] + v.shape[0], k.shape[1])),
        key_scale=s,
    )


def _spectrum_from_gram(gram: torch.Tensor, rank_budget: int) -> torch.Tensor:
    """Singular values of W (descending, float64, on the CPU) from the eigenvalues of its Gram matrix WᵀW
    (float64, or float32 as spectrum_dtype chooses).

    Measured on one Wan-1.3B layer (three 1536-wide spectra), this beats an SVD of W on both devices: 0.5 s on
    2 CPU cores against 0.8 s for float32 `svdvals`, and 52 ms on an H200 against 319 ms for float32 `svdvals`,
    whose default CUDA solver (gesvdj) was off by 2e-4*σ_1. In float64 the squared singular values -- all that
    effective rank and spectral error use -- come out to float64 precision relative to σ_1². The price is that
    singular values below ~sqrt(n*eps)*σ_1 (about 1e-6*σ_1) are not resolved; they carry < 1e-12 of the energy.
    """
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0)[:rank_budget].clamp(min=0)
    # Rounding leaves eigenvalues of order n*eps*λ_max where the true value is 0; calling those 0 lets a
    # rank-deficient matrix report its rank. The bound is float64's whatever the Gram's dtype: float32's would
    # zero every σ below ~2.5% of σ_1 of a 5120-wide layer, real ones included; its rounding noise left in their
    # place carries ~1e-7 of σ_1² each, nothing a 99% energy or an error at dc can see.
    tolerance = gram.shape[0] * torch.finfo(torch.float64).eps * eigenvalues[0]
    return torch.where(eigenvalues > tolerance, eigenvalues, 0.0).double().sqrt().cpu()


def effective_rank(sigma: ArrayLike, energy: float) -> int:
    """Smallest r with sum_{i<=r} σ_i² >= energy * Σ σ_i² (0 for an all-zero spectrum).

    Cumulative energy is taken relative to its own last entry, so energy=1 gives exactly the number of
    singular values up to the last nonzero one.
    """
    cumulative = np.cumsum(np.square(np.asarray(sigma, dtype=np.float64)))
    if cumulative.size == 0 or cumulative[-1] == 0:
        return 0
    return int(np.searchsorted(cumulative / cumulative[-1], energy, side="left")) + 1


def truncation_at(sigma: ArrayLike, dc: int) -> tuple[float, float]:
    """(energy kept, relative Frobenius error) of the best rank-dc approximation.

    The error is sqrt(tail energy / total), which Eckart–Young makes the exact relative error of the truncated
    SVD. It is summed from the tail rather than taken as sqrt(1 - kept), which would cancel to noise when
    almost all energy is kept.
    """
    squares = np.square(np.asarray(sigma, dtype=np.float64))
    total = squares.sum()
    if total == 0:
        return 1.0, 0.0
    return float(squares[:dc].sum() / total), float(np.sqrt(squares[dc:].sum() / total))


def _singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.double()).cpu()


def _product_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of a @ b (a: m x dc, b: dc x n) from dc x dc factors: A B = Qa Ra Rbᵀ Qbᵀ."""
    ra = torch.linalg.qr(a.double(), mode="r").R
    rb = torch.linalg.qr(b.double().T, mode="r").R
    return _singular_values(ra @ rb.T)


def mla_utilisation(weights: Mapping[str, torch.Tensor], *, latents: torch.Tensor | None = None, energy: float = 0.99) -> dict[str, Any]:
    """How much of the dc budget one MLA layer uses: effective rank / dc of W_KV_down, W_K_up W_KV_down,
    W_V_up W_KV_down and (with calibration tokens) of the cached latents c. `weights` are the layer's
    `self_attn.*` tensors without the prefix."""
    down = weights["kv_down.weight"]
    dc = down.shape[0]
    spectra = {
        "kv_down": _singular_values(down),
        "k_up_kv_down": _product_singular_values(weights["k_up.weight"], down) if weights["k_up.weight"].numel() else None,
        "v_up_kv_down": _product_singular_values(weights["v_up.weight"], down),
        "latents": _singular_values(latents) if latents is not None else None,
    }
    out: dict[str, Any] = {"dc": dc}
    for name, sigma in spectra.items():
        if sigma is None:
            out[name] = None
            continue
        rank = effective_rank(sigma, energy)
        out[name] = {"effective_rank": rank, "utilisation": rank / dc}
    return out
