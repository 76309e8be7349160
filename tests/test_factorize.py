"""Each DESIGN §3 step of factorize.py on its own, against numpy or a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlaconvert.conversion.factorize import (
    _svd,
    RopeKey,
    Whitener,
    auto_dc,
    choose_rope_pairs,
    factor_content_value,
    fold_query,
    key_pair_matrices,
    rope_key_energy,
)
from mlaconvert.modeling.rope import axis_pairs, rope_quota


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.9, 0.999])
def test_auto_dc_is_the_cumulative_energy_threshold_rounded_up_to_16(energy):
    sigma = np.sort(np.random.default_rng(0).gamma(0.3, size=96))[::-1]
    share = np.cumsum(sigma**2) / np.sum(sigma**2)
    rank = int(np.argmax(share >= energy)) + 1
    assert auto_dc(torch.from_numpy(sigma.copy()), energy, dim=96) == min(96, max(16, 16 * int(np.ceil(rank / 16))))


def test_auto_dc_at_a_multiple_of_16_and_at_the_caps():
    sigma = torch.tensor([1.0] * 32 + [0.0] * 100, dtype=torch.float64)  # 32 equal values hold all the energy
    assert auto_dc(sigma, 1.0, dim=128) == 32
    assert auto_dc(sigma, 17 / 32, dim=128) == 32 and auto_dc(sigma, 16 / 32, dim=128) == 16
    assert auto_dc(sigma, 1.0, dim=24) == 24


def complex_normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def lower_triangular(rng: np.random.Generator, n: int) -> np.ndarray:
    """A well-conditioned Cholesky-like factor L, standing in for the inputs' C = L Lᵀ."""
    return np.tril(rng.standard_normal((n, n))) + 3 * np.eye(n)


def tail_norm(sigma: np.ndarray, rank: int) -> float:
    """Eckart–Young: the Frobenius error of the best rank-`rank` approximation."""
    return float(np.sqrt(np.sum(sigma[rank:] ** 2)))


def test_key_pair_matrices_pair_each_heads_two_rows_as_one_complex_row():
    rng = np.random.default_rng(0)
    heads, head_dim, cols = 2, 6, 5
    w = rng.standard_normal((heads * head_dim, cols))
    a = key_pair_matrices(torch.from_numpy(w), heads).numpy()
    for p in range(head_dim // 2):
        for h in range(heads):
            np.testing.assert_array_equal(a[p, h], w[h * head_dim + 2 * p] + 1j * w[h * head_dim + 2 * p + 1])


@pytest.mark.parametrize("weighted", [False, True])
def test_choose_rope_pairs_keeps_most_rank1_energy_per_axis_at_the_eckart_young_optimum(weighted):
    rng = np.random.default_rng(1)
    heads, head_dim, cols = 3, 24, 9
    a = complex_normal(rng, head_dim // 2, heads, cols)
    chol = lower_triangular(rng, cols) if weighted else np.eye(cols)
    whiten = Whitener(torch.from_numpy(chol), torch.from_numpy(np.linalg.inv(chol))) if weighted else None
    quota = rope_quota(head_dim, 12)
    key = choose_rope_pairs(torch.from_numpy(a), quota, whiten)

    b = a @ chol
    sigma = np.linalg.svd(b, compute_uv=False)  # (pairs, heads), per pair
    expected = tuple(
        tuple(sorted(p for p in axis if (sigma[axis, 0] ** 2 > sigma[p, 0] ** 2).sum() < q)) for axis, q in zip(axis_pairs(head_dim), quota)
    )
    assert key.pairs == expected and key.flat == [p for axis in expected for p in axis]
    assert expected != tuple(tuple(axis[:q]) for axis, q in zip(axis_pairs(head_dim), quota))  # not the leading pairs
    rope = key.flat
    assert key.energy_kept == pytest.approx((sigma[rope, 0] ** 2).sum() / (np.abs(b[rope]) ** 2).sum(), rel=1e-12)
    alpha, rows = key.alpha.numpy(), key.rows.numpy()
    for i, p in enumerate(rope):
        residual = (a[p] - np.outer(alpha[i], rows[i])) @ chol
        assert np.linalg.norm(residual) == pytest.approx(tail_norm(sigma[p], 1), rel=1e-9)
        assert np.sum(np.abs(alpha[i]) ** 2) == pytest.approx(heads, rel=1e-12)


@pytest.mark.parametrize("dc", [3, 10])
@pytest.mark.parametrize("weighted", [False, True])
def test_factor_content_value_is_the_eckart_young_truncation_of_the_balanced_joint_matrix(dc, weighted):
    rng = np.random.default_rng(2)
    dim = 16
    wk_n, wv = 5 * rng.standard_normal((10, dim)), rng.standard_normal((dim, dim))
    chol = lower_triangular(rng, dim) if weighted else np.eye(dim)
    cv = factor_content_value(torch.from_numpy(wk_n), torch.from_numpy(wv), dc, x_whitener=torch.from_numpy(chol) if weighted else None)

    s = np.linalg.norm(wv @ chol) / np.linalg.norm(wk_n @ chol)
    m = np.concatenate([s * wk_n, wv])
    sigma = np.linalg.svd(m @ chol, compute_uv=False)
    m_hat = np.concatenate([s * cv.k_up.numpy(), cv.v_up.numpy()]) @ cv.kv_down.numpy()
    assert cv.kv_down.shape == (dc, dim) and cv.key_scale == pytest.approx(s, rel=1e-12)
    np.testing.assert_allclose(cv.singular_values.numpy(), sigma, rtol=1e-10)
    assert np.linalg.norm((m - m_hat) @ chol) == pytest.approx(tail_norm(sigma, dc), rel=1e-9)


def test_factor_content_value_draws_random_factors_at_the_dense_scale():
    rng = np.random.default_rng(3)
    dim, dc = 64, 48
    wk_n, wv = 3 * rng.standard_normal((96, dim)), 0.5 * rng.standard_normal((dim, dim))
    draws = [
        factor_content_value(torch.from_numpy(wk_n), torch.from_numpy(wv), dc, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]
    for cv in draws:
        # Frobenius norms of Gaussian draws: within 5% at these sizes (their relative spread is ~1%).
        assert np.linalg.norm(cv.k_up.numpy()) == pytest.approx(np.linalg.norm(wk_n), rel=0.05)
        assert np.linalg.norm(cv.v_up.numpy()) == pytest.approx(np.linalg.norm(wv), rel=0.05)
        assert np.linalg.norm(cv.kv_down.numpy()) == pytest.approx(np.sqrt(dc), rel=0.05)
        # The spectrum reported is still that of the content joint matrix.
        m = np.concatenate([np.linalg.norm(wv) / np.linalg.norm(wk_n) * wk_n, wv])
        np.testing.assert_allclose(cv.singular_values.numpy(), np.linalg.svd(m, compute_uv=False), rtol=1e-10)
    assert not torch.equal(draws[0].kv_down, draws[1].kv_down)


@pytest.mark.parametrize("q_rank,weighted", [(None, False), (5, False), (5, True)])
def test_fold_query_permutes_moves_the_key_weight_and_mixes(q_rank, weighted):
    rng = np.random.default_rng(4)
    heads, head_dim = 2, 8
    dim = heads * head_dim
    content, rope = [0, 2], [3, 1]
    wq, bq = rng.standard_normal((dim, dim)), rng.standard_normal(dim)
    g_q, g_k = rng.uniform(0.5, 1.5, dim), rng.uniform(0.5, 1.5, dim)
    alpha = complex_normal(rng, len(rope), heads)
    chol = lower_triangular(rng, dim) if weighted else np.eye(dim)
    attn = {"q.weight": torch.from_numpy(wq), "q.bias": torch.from_numpy(bq), "norm_q.weight": torch.from_numpy(g_q)}
    folded, query = fold_query(attn, torch.from_numpy(g_k), content, rope, torch.from_numpy(alpha), q_rank=q_rank,
                               x_whitener=torch.from_numpy(chol) if weighted else None)

    order = [h * head_dim + 2 * p + j for h in range(heads) for p in content + rope for j in (0, 1)]
    content_dims = {h * head_dim + 2 * p + j for h in range(heads) for p in content for j in (0, 1)}
    expected_norm = [g_q[i] * g_k[i] if i in content_dims else g_q[i] for i in order]
    np.testing.assert_allclose(folded["norm_q.weight"].numpy(), expected_norm, rtol=1e-15)
    mix = folded["q_rope_mix"].numpy()
    for h in range(heads):
        for i in range(len(rope)):
            q = rng.standard_normal(2)
            mixed = np.conj(alpha[i, h]) * (q[0] + 1j * q[1])
            np.testing.assert_allclose(mix[h, i] @ q, [mixed.real, mixed.imag], rtol=1e-12)
    if q_rank is None:
        np.testing.assert_array_equal(query["q.weight"].numpy(), wq[order])
        np.testing.assert_array_equal(query["q.bias"].numpy(), bq[order])
    else:
        approx = query["q_up.weight"].numpy() @ query["q_down.weight"].numpy()
        sigma = np.linalg.svd(wq[order] @ chol, compute_uv=False)
        assert np.linalg.norm((wq[order] - approx) @ chol) == pytest.approx(tail_norm(sigma, q_rank), rel=1e-9)
        np.testing.assert_array_equal(query["q_up.bias"].numpy(), bq[order])


def test_rope_key_energy_is_exact_when_heads_are_complex_multiples_of_the_rope_row():
    rng = np.random.default_rng(5)
    heads, head_dim = 3, 8
    dim = heads * head_dim
    key = RopeKey(pairs=((1,), (2,), ()), rows=torch.from_numpy(complex_normal(rng, 2, dim + 1)),
                  alpha=torch.from_numpy(complex_normal(rng, 2, heads)), energy_kept=1.0)
    g_k = rng.uniform(0.5, 1.5, dim)
    w_aug = rng.standard_normal((dim, dim + 1))  # the content pairs' rows play no part
    for i, p in enumerate(key.flat):
        for h in range(heads):
            row = key.alpha.numpy()[i, h] * key.rows.numpy()[i]  # the key as the score sees it, after g_k
            w_aug[h * head_dim + 2 * p] = row.real / g_k[h * head_dim + 2 * p]
            w_aug[h * head_dim + 2 * p + 1] = row.imag / g_k[h * head_dim + 2 * p + 1]
    form = rope_key_energy(torch.from_numpy(w_aug), torch.from_numpy(g_k), key, heads).numpy()

    x = np.concatenate([rng.standard_normal((50, dim)), np.ones((50, 1))], axis=1)
    r = key.rows.numpy() @ x.T  # (R, tokens)
    for i, p in enumerate(key.flat):
        dims = [h * head_dim + 2 * p + j for h in range(heads) for j in (0, 1)]
        heads_energy = ((w_aug[dims] @ x.T) ** 2).sum(0)
        pair = np.stack([r[i].real, r[i].imag])
        np.testing.assert_allclose(np.einsum("at,ab,bt->t", pair, form[i], pair), heads_energy, rtol=1e-9)


def test_rope_key_energy_of_a_random_rope_key_is_what_the_heads_reconstruct():
    rng = np.random.default_rng(6)
    heads, head_dim = 3, 8
    dim = heads * head_dim
    key = RopeKey(pairs=((0,), (2,), ()), rows=torch.from_numpy(complex_normal(rng, 2, dim + 1)),
                  alpha=torch.ones(2, heads, dtype=torch.complex128), energy_kept=1.0)
    g_k = rng.uniform(0.5, 1.5, dim)
    form = rope_key_energy(torch.from_numpy(rng.standard_normal((dim, dim + 1))), torch.from_numpy(g_k), key, heads, random=True).numpy()
    for i, p in enumerate(key.flat):
        # Each head holds G_h⁻¹ r: its energy is Σ_h Σ_j r_j² / g_(h,p,j)².
        expected = np.diag([sum(g_k[h * head_dim + 2 * p + j] ** -2 for h in range(heads)) for j in (0, 1)])
        np.testing.assert_allclose(form[i], expected, rtol=1e-12)


@pytest.mark.parametrize("keep", [64, None])
def test_the_gram_route_of_a_wan_size_matrix_truncates_as_a_float64_svd(keep: int | None) -> None:
    # Above 2**21 entries the SVD comes from the Gram's eigenvectors (only the top `keep` of them when given);
    # numpy's float64 SVD is the reference.
    g = np.random.default_rng(0)
    m = g.standard_normal((1800, 1300)) * (0.97 ** np.arange(1300))  # a decaying spectrum, as trained weights have
    m[:, -5:] = 0  # and a few exactly zero directions, which must not turn into NaN
    u, s, vh = _svd(torch.from_numpy(m), keep=keep)
    assert u.shape == (1800, keep or 1300) and vh.shape == (keep or 1300, 1300) and torch.isfinite(u).all()
    ref_u, ref_s, ref_vh = np.linalg.svd(m, full_matrices=False)
    resolved = ref_s > 1e-4 * ref_s[0]  # what the docstring promises, with room: σ above ~1e-7 σ₁
    np.testing.assert_allclose(s.numpy()[resolved], ref_s[resolved], rtol=1e-7)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6 * ref_s[0])
    assert (s.numpy()[-5:] == 0).all()
    for r in (16, 64):
        ours = (u[:, :r] * s[:r]) @ vh[:r]
        theirs = (ref_u[:, :r] * ref_s[:r]) @ ref_vh[:r]
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-9 * np.abs(theirs).max())
