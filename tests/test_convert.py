"""The conversion math (DESIGN §3 invariants) and the export contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_model, convert_source
from mlaconvert.conversion.factorize import factorize_layer, key_energy_form
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import MLAConfig, WanConfig
from mlaconvert.modeling.attention import DenseSelfAttention, LatentSelfAttention
from mlaconvert.modeling.rope import rope_quota
from mlaconvert.modeling.rope import Angles, grid_positions
from mlaconvert.recipes import parse_dc


def dense_attention(heads: int, head_dim: int, seed: int = 0, shared_rope_direction: bool = False) -> DenseSelfAttention:
    """A dense self-attention with non-trivial weights, biases and key/query norm weights."""
    torch.manual_seed(seed)
    dim = heads * head_dim
    attn = DenseSelfAttention(WanConfig(dim=dim, num_heads=heads, ffn_dim=8, num_layers=1)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        attn.norm_q.weight.add_(1.0)
        attn.norm_k.weight.add_(1.0)
        if shared_rope_direction:
            # Every head's key pair = a complex multiple of head 0's, as seen after the key-norm weight.
            g = torch.rand(head_dim // 2, dtype=torch.float64) + 0.5
            attn.norm_k.weight.copy_(g.repeat_interleave(2).repeat(heads))
            w = attn.k.weight.view(heads, head_dim // 2, 2, dim)
            b = attn.k.bias.view(heads, head_dim // 2, 2)
            base_w, base_b = torch.complex(w[0, :, 0], w[0, :, 1]), torch.complex(b[0, :, 0], b[0, :, 1])
            for h in range(1, heads):
                a = torch.randn(head_dim // 2, dtype=torch.complex128)
                zw, zb = a[:, None] * base_w, a * base_b
                w[h, :, 0], w[h, :, 1], b[h, :, 0], b[h, :, 1] = zw.real, zw.imag, zb.real, zb.imag
    return attn


def dense_config(heads: int, head_dim: int) -> WanConfig:
    return WanConfig(dim=heads * head_dim, num_heads=heads, ffn_dim=8, num_layers=1)


def mla_config(heads: int, head_dim: int, dc: int, rope_dim: int, factors, q_rank: int | None = None) -> WanConfig:
    mla = MLAConfig(dc=(dc,), rope_dim=rope_dim, nope_dim=head_dim - rope_dim, q_rank=q_rank, rope_pairs=(factors.rope_pairs,))
    return dense_config(heads, head_dim).replace(mla=mla)


def latent_from(attn: DenseSelfAttention, heads: int, head_dim: int, dc: int, rope_dim: int, **kw):
    factors = factorize_layer(dict(attn.state_dict()), num_heads=heads, dc=dc, rope_dim=rope_dim, **kw)
    latent = LatentSelfAttention(mla_config(heads, head_dim, dc, rope_dim, factors, kw.get("q_rank")), 0).double()
    latent.load_state_dict({k: v.double() for k, v in factors.weights.items()})
    return latent, factors


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("head_dim", [24, 64])
def test_one_head_full_rank_full_rope_is_exact(head_dim):
    dense = dense_attention(1, head_dim)
    latent, _ = latent_from(dense, 1, head_dim, dc=head_dim, rope_dim=head_dim)
    x, pos = torch.randn(2, 3 * 4 * 5, head_dim, dtype=torch.float64), Angles.at(grid_positions(3, 4, 5, first_frame=7), head_dim)
    with torch.no_grad():
        assert relative(latent(x, pos), dense(x, pos)) < 1e-6  # the attention math runs in float32 internally


def test_rope_key_is_exact_when_heads_share_a_direction():
    dense = dense_attention(3, 24, shared_rope_direction=True)
    latent, factors = latent_from(dense, 3, 24, dc=72, rope_dim=24)
    assert factors.rope_energy_kept == pytest.approx(1.0, abs=1e-12)
    x, pos = torch.randn(1, 2 * 3 * 4, 72, dtype=torch.float64), Angles.at(grid_positions(2, 3, 4), 24)
    with torch.no_grad():
        assert relative(latent(x, pos), dense(x, pos)) < 1e-6
    # ... and not exact when they do not: the test above could fail.
    other = dense_attention(3, 24, seed=1)
    latent2, factors2 = latent_from(other, 3, 24, dc=72, rope_dim=24)
    assert factors2.rope_energy_kept < 0.9
    with torch.no_grad():
        assert relative(latent2(x, pos), other(x, pos)) > 1e-2


def test_measured_key_errors_vanish_exactly_when_the_layer_is_exact():
    from mlaconvert.conversion.convert import measure_layer

    heads, hd = 3, 24
    x, pos = torch.randn(1, 2 * 3 * 4, heads * hd), Angles.at(grid_positions(2, 3, 4), hd)
    errors = {}
    for shared in (True, False):
        dense = dense_attention(heads, hd, seed=1, shared_rope_direction=shared)
        factors = factorize_layer(dict(dense.state_dict()), num_heads=heads, dc=heads * hd, rope_dim=24)
        mla = mla_config(heads, hd, heads * hd, 24, factors)
        errors[shared] = measure_layer(dict(dense.state_dict()), factors, [(x, pos)], dense_config(heads, hd), mla, 0)
    assert max(errors[True][k] for k in ("k_error", "k_normed_error", "v_error", "attn_error")) < 1e-5
    # Heads that disagree on the rope direction: the shared rank-1 key misses, and the measure sees it.
    assert errors[False]["k_error"] > 1e-2 and errors[False]["k_normed_error"] > 1e-2 and errors[False]["v_error"] < 1e-5


@pytest.mark.parametrize("dc", [8, 30, 60])
def test_svd_reconstruction_is_the_eckart_young_optimum(dc):
    heads, hd = 3, 24
    dense = dense_attention(heads, hd)
    factors = factorize_layer(dict(dense.state_dict()), num_heads=heads, dc=dc, rope_dim=12)
    w = factors.weights
    rope = [p for axis in factors.rope_pairs for p in axis]
    content = [p for p in range(hd // 2) if p not in rope]
    rows = [h * hd + d for h in range(heads) for p in content for d in (2 * p, 2 * p + 1)]
    wk = dense.k.weight.detach().numpy()[rows]
    wv = dense.v.weight.detach().numpy()
    s = np.linalg.norm(wv) / np.linalg.norm(wk)
    m = np.concatenate([s * wk, wv])
    m_hat = np.concatenate([s * w["k_up.weight"].numpy(), w["v_up.weight"].numpy()]) @ w["kv_down.weight"].numpy()
    sigma = np.linalg.svd(m, compute_uv=False)
    closed_form = np.sqrt((sigma[dc:] ** 2).sum() / (sigma**2).sum())
    assert np.linalg.norm(m - m_hat) / np.linalg.norm(m) == pytest.approx(closed_form, rel=1e-9)
    np.testing.assert_allclose(factors.kv_singular_values.numpy(), sigma, rtol=1e-5)


def test_rope_quota_follows_wan_proportion_and_refuses_what_cannot_be_shared():
    assert rope_quota(128, 32) == (6, 5, 5)
    assert rope_quota(128, 128) == (22, 21, 21)
    assert rope_quota(64, 6) == (1, 1, 1)
    for bad, msg in [(31, "positive even"), (130, "larger than the head dim"), (4, "three RoPE axes")]:
        with pytest.raises(MlaconvertError, match=msg):
            rope_quota(128, bad)


@pytest.fixture(scope="module")
def tiny():
    return load_source("builtin:tiny-wan")


@pytest.mark.parametrize("init", ["svd", "asvd"])
def test_measured_attention_error_falls_as_dc_grows(tiny, init):
    errors = []
    for dc in (4, 8, 16, 32):
        conv = convert_model(tiny, ConvertSettings(dc=dc, rope_dim=16, init=init))
        errors.append(np.mean([layer["measured"]["attn_error"] for layer in conv.layers]))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_asvd_beats_svd_on_the_calibration_tokens(tiny):
    svd = convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="svd"))
    asvd = convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="asvd"))
    for a, b in zip(asvd.layers, svd.layers):
        assert a["measured"]["v_error"] < b["measured"]["v_error"]


def test_random_init_keeps_the_dense_scale(tiny):
    conv = convert_model(tiny, ConvertSettings(dc=64, rope_dim=16, init="random"))
    for layer in conv.layers:
        # Random projections are uncorrelated with the dense ones: relative error near sqrt(2), never 10x off.
        assert 0.8 < layer["measured"]["v_error"] < 2.5


def test_export_contract_and_bit_identical_weights(tiny, tmp_path):
    out = tmp_path / "mla"
    conv, report = convert_source("builtin:tiny-wan", out, ConvertSettings(dc=48, rope_dim=16, q_rank=96))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "rank_report.json", "rank_report.png", "README.md"} <= names
    assert not [n for n in names if n.startswith(".")]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dim"] == 192 and cfg["mla"]["dc"] == [48, 48] and cfg["mla"]["rope_dim"] == 16
    assert cfg["mla"]["nope_dim"] == 48 and cfg["mla"]["q_rank"] == 96 and cfg["mla"]["init"] == "svd"
    assert len(cfg["mla"]["rope_pairs"][0]) == 3 and sum(map(len, cfg["mla"]["rope_pairs"][0])) == 8
    assert cfg["mla"]["source"]["format"] == "wan" and len(cfg["mla"]["source"]["sha256"]) == 64
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.self_attn.kv_down.weight").shape == (48, 192)
        assert f.get_tensor("blocks.0.self_attn.k_up.weight").shape == (3 * 48, 48)
        assert f.get_tensor("blocks.0.self_attn.v_up.weight").shape == (192, 48)
        assert f.get_tensor("blocks.0.self_attn.k_rope.weight").shape == (16, 192)
    assert "blocks.0.self_attn.k.weight" not in keys and "blocks.1.self_attn.q_down.weight" in keys
    exported = load_source(str(out))
    assert exported.format == "mlaconvert" and exported.config.mla.dc == (48, 48)
    outside = [k for k in tiny.state_dict if ".self_attn." not in k]
    assert outside and all(torch.equal(exported.state_dict[k], tiny.state_dict[k]) for k in outside)
    layer = report["layers"][0]
    assert {"k", "v", "kv", "mla"} <= set(layer)
    assert {"k_error", "v_error", "attn_error"} <= set(layer["mla"]["measured"])
    assert set(layer["mla"]["utilisation"]) >= {"kv_down", "k_up_kv_down", "v_up_kv_down", "latents"}
    assert layer["mla"]["cached_values_per_token"] == {"dense": 384, "mla": 64}


def test_wan_1_3b_width_caches_224_instead_of_3072(tmp_path):
    """One layer of the real 1.3B width (random weights): the per-token cache figure of the README."""
    from mlaconvert.checkpoints.formats import Checkpoint, native_shapes

    config = WanConfig(num_layers=1, ffn_dim=64, text_dim=64, text_len=8, freq_dim=32, in_dim=4, out_dim=4)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(*shape, generator=g) / (shape[-1] ** 0.5 if len(shape) > 1 else 1) for k, shape in native_shapes(config).items()}
    conv = convert_model(Checkpoint(config=config, state_dict=sd, format="wan", files=[], info={}), ConvertSettings(dc=192, measure=False))
    assert conv.layers[0]["cached_values_per_token"] == {"dense": 3072, "mla": 224}
    assert conv.config.kv_values_per_token(0) == 224 and config.kv_values_per_token() == 3072


def test_parse_dc_forms(tmp_path):
    assert parse_dc("192") == 192 and parse_dc("auto") == "auto" and parse_dc("16, 32") == [16, 32]
    (tmp_path / "dc.json").write_text("[16, 48]")
    (tmp_path / "dc.toml").write_text("dc = [32, 64]")
    assert parse_dc(str(tmp_path / "dc.json")) == [16, 48]
    assert parse_dc(str(tmp_path / "dc.toml")) == [32, 64]


def numpy_auto_dc(sigma: np.ndarray, energy: float, dim: int) -> int:
    """The auto dc rule by hand: the first index whose cumulative energy share reaches `energy`, rounded up to 16."""
    share = np.cumsum(sigma**2) / np.sum(sigma**2)
    rank = int(np.argmax(share >= energy)) + 1
    return min(dim, max(16, -(-rank // 16) * 16))


def test_per_layer_and_auto_dc(tiny):
    conv = convert_model(tiny, ConvertSettings(dc=[16, 64], rope_dim=16, measure=False))
    assert conv.config.mla.dc == (16, 64)
    cfg = tiny.config
    for energy in (0.5, 0.9):
        auto = convert_model(tiny, ConvertSettings(dc="auto", energy=energy, rope_dim=16, measure=False))
        expected = []
        for i, pairs in enumerate(auto.config.mla.rope_pairs):
            rope = {p for axis in pairs for p in axis}
            rows = [h * cfg.head_dim + d for h in range(cfg.num_heads) for p in range(cfg.head_dim // 2) if p not in rope for d in (2 * p, 2 * p + 1)]
            wk = tiny.state_dict[f"blocks.{i}.self_attn.k.weight"].double().numpy()[rows]
            wv = tiny.state_dict[f"blocks.{i}.self_attn.v.weight"].double().numpy()
            m = np.concatenate([np.linalg.norm(wv) / np.linalg.norm(wk) * wk, wv])
            expected.append(numpy_auto_dc(np.linalg.svd(m, compute_uv=False), energy, cfg.dim))
        assert auto.config.mla.dc == tuple(expected)
        assert all(16 < d < cfg.dim for d in expected)  # neither clamp decides: the threshold does



@pytest.mark.parametrize(
    "args,message",
    [
        (["--dc", "0"], "rank budget"),
        (["--dc", "500"], "rank budget"),
        (["--dc", "16,16,16"], "lists 3 widths"),
        (["--rope-dim", "15"], "positive even"),
        (["--rope-dim", "66"], "larger than the head dim"),
        (["--rope-dim", "4"], "three RoPE axes"),
        (["--q-rank", "1000"], "--q-rank"),
        (["--init", "pca"], "--init"),
    ],
)
def test_bad_convert_options_give_one_line(cli, tmp_path, args, message):
    out = tmp_path / "o"
    r = cli("convert", "builtin:tiny-wan", "-o", str(out), *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_and_mla_source_are_refused(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("convert", "builtin:tiny-wan", "-o", str(out), "--dc", "32", "--rope-dim", "16", "--no-measure")
    assert r.returncode == 0, r.stderr
    r = cli("convert", "builtin:tiny-wan", "-o", str(out), "--dc", "32", "--rope-dim", "16")
    assert r.returncode != 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = cli("convert", str(out), "-o", str(tmp_path / "again"), "--dc", "32", "--rope-dim", "16")
    assert r.returncode != 0 and "already an MLA export" in r.stderr
    r = cli("analyze", str(out), "-o", str(tmp_path / "analysis"))
    assert r.returncode == 0, r.stderr
    assert "utilisation" in r.stdout.lower()


def test_calibration_that_cannot_fit_gives_advice(tiny, monkeypatch):
    monkeypatch.setattr("mlaconvert.conversion.calibration._available_memory", lambda device: 1000)
    with pytest.raises(MlaconvertError, match="--init svd or --init random with --no-measure"):
        convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="asvd"))
    conv = convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="svd", measure=False))  # no calibration: fine
    assert conv.calibration is None


def test_calibration_second_moment_is_the_mean_over_every_recorded_token(tiny):
    from mlaconvert.conversion.calibration import calibrate
    from mlaconvert.modeling.model import load_model

    model = load_model(tiny.config, tiny.state_dict).eval()
    timesteps = (1000.0, 500.0)
    calib = calibrate(model, frames=2, height=8, width=8, timesteps=timesteps, keep_samples=len(timesteps))
    for moment, samples in zip(calib.second_moments, calib.samples):
        assert len(samples) == len(timesteps)  # batch 1: the kept samples are every token the layer saw
        x = np.concatenate([s[0].double().numpy().reshape(-1, tiny.config.dim) for s in samples])
        aug = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        assert calib.description["tokens"] == len(x)
        np.testing.assert_allclose(moment.numpy(), aug.T @ aug / calib.description["tokens"], rtol=1e-6, atol=1e-9)


def test_calibration_on_clips_noises_them_as_flow_matching_does(tiny):
    from mlaconvert.conversion.calibration import calibrate, recording_forwards
    from mlaconvert.modeling.model import load_model

    model = load_model(tiny.config, tiny.state_dict).eval()
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(2, tiny.config.in_dim, 2, 8, 8, generator=gen)
    text = torch.randn(2, tiny.config.text_len, tiny.config.text_dim, generator=gen)
    seen = []
    with torch.no_grad(), recording_forwards([model.blocks[0].self_attn], lambda _i, args, _y: seen.append(args[0])):
        model(video, torch.zeros(2), text)  # t = 0: the clean clips themselves
    clean = calibrate(model, timesteps=(0.0,), clips=(video, text), keep_samples=1)
    torch.testing.assert_close(clean.samples[0][0][0], seen[0][:1].float())
    assert clean.description["tokens"] == 2 * 2 * 8 * 8 // 4 and clean.description["latent_shape"] == [tiny.config.in_dim, 2, 8, 8]
    # t = 1000: pure noise of the same seed whatever the clips, with their text still.
    noise_only = [calibrate(model, timesteps=(1000.0,), clips=(v, text)).second_moments[0] for v in (video, torch.zeros_like(video))]
    torch.testing.assert_close(noise_only[0], noise_only[1])


def test_a_world_model_is_calibrated_on_clips_of_its_world_at_its_own_timesteps():
    from mlaconvert.checkpoints.builtin import make_tiny_wan
    from mlaconvert.checkpoints.formats import Checkpoint
    from mlaconvert.evaluation import world
    from mlaconvert.modeling.config import SamplerDefaults

    config = WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=32, text_len=16, freq_dim=16,
                       vae_stride=(1, 1, 1), text_encoder="captions", world=world.WorldSettings(size=16, max_radius=3.0),
                       sampler=SamplerDefaults(steps=3, shift=1.0, chunk=3, window=9))
    checkpoint = Checkpoint(config, make_tiny_wan(0, config), "mlaconvert", [])
    conv = convert_model(checkpoint, ConvertSettings(dc=8, rope_dim=8, init="asvd"))
    assert "clips" in conv.calibration["inputs"] and conv.calibration["latent_shape"] == [3, 3, 16, 16]
    assert conv.calibration["timesteps"] == pytest.approx([1000.0, 2000.0 / 3, 1000.0 / 3])  # its 3 steps, unshifted


def test_recording_forwards_sees_each_module_and_stops_on_leaving():
    from mlaconvert.conversion.calibration import recording_forwards

    modules = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)]
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    x = torch.randn(5, 3)
    with recording_forwards(modules, lambda i, args, y: seen.append((i, args[0], y))):
        outputs = [m(x) for m in reversed(modules)]
    assert [i for i, _, _ in seen] == [1, 0]
    assert all(a is x and torch.equal(y, out) for (_, a, y), out in zip(seen, outputs))
    modules[0](x)
    assert len(seen) == 2


def _energy_objective(q: np.ndarray, p: np.ndarray, n: np.ndarray) -> float:
    """E over z ~ N(0, I) of (zᵀ (Pᵀ Q P - N) z)², by the Gaussian identity 2|D|_F² + (tr D)²."""
    d = p.T @ q @ p - n
    return 2 * (d**2).sum() + np.trace(d) ** 2


def test_key_energy_form_is_the_least_squares_fit_over_gaussian_tokens():
    rng = np.random.default_rng(0)
    pairs, heads, n = 3, 4, 6
    s, k = rng.standard_normal((pairs, 2, n)), rng.standard_normal((pairs, heads, 2, n))
    chol = np.tril(rng.standard_normal((n, n))) + 3 * np.eye(n)
    form = key_energy_form(*(torch.from_numpy(a) for a in (s, k, chol))).numpy()
    basis = [np.array([[1.0, 0], [0, 0]]), np.array([[0, 0], [0, 1.0]]), np.array([[0, 1.0], [1, 0]])]
    for r in range(pairs):
        p, kl = s[r] @ chol, k[r] @ chol
        n_mat = sum(kh.T @ kh for kh in kl)
        # Independent reference: the same objective as a stacked linear least-squares problem in Q's 3 entries.
        design = np.stack([np.append(np.sqrt(2) * (p.T @ e @ p).ravel(), np.trace(p.T @ e @ p)) for e in basis], axis=1)
        target = np.append(np.sqrt(2) * n_mat.ravel(), np.trace(n_mat))
        q = sum(c * e for c, e in zip(np.linalg.lstsq(design, target, rcond=None)[0], basis))
        assert np.linalg.eigvalsh(q).min() > 0  # the PSD clamp is inactive here, so the two must agree
        np.testing.assert_allclose(form[r], q, rtol=1e-9, atol=1e-12)
        # It is the minimum: any nudge raises the objective, and the objective is the Monte Carlo mean square.
        for e in basis:
            assert _energy_objective(q + 1e-3 * e, p, n_mat) > _energy_objective(q, p, n_mat)
        z = rng.standard_normal((200_000, n))
        d = p.T @ q @ p - n_mat
        mc = np.mean(np.einsum("ti,ij,tj->t", z, d, z) ** 2)
        assert mc == pytest.approx(_energy_objective(q, p, n_mat), rel=0.03)


def test_key_energy_form_is_exact_when_heads_are_maps_of_the_rope_key():
    rng = np.random.default_rng(1)
    s, maps = rng.standard_normal((2, 2, 7)), rng.standard_normal((2, 3, 2, 2))
    k = maps @ s[:, None]  # every head's rows are a 2x2 map of the shared rope rows
    form = key_energy_form(torch.from_numpy(s), torch.from_numpy(k)).numpy()
    np.testing.assert_allclose(form, np.einsum("rhia,rhib->rab", maps, maps), rtol=1e-9)


def test_report_picture_keeps_errors_and_utilisation_apart_and_names_the_export(tmp_path):
    from mlaconvert.conversion.rank import report_figure

    _, report = convert_source("builtin:tiny-wan", tmp_path / "out", ConvertSettings(dc=32, rope_dim=16))
    assert report["export"] == str(tmp_path / "out")
    fig = report_figure(report)
    fig.canvas.draw()
    title = fig.get_suptitle()
    assert str(tmp_path / "out") in title and "builtin:tiny-wan" in title
    panels = {ax.get_title().split(") ")[-1]: ax for ax in fig.axes if ax.get_title()}
    utilisation, errors = panels["rank utilisation of the latent budget"], panels["measured conversion error"]
    assert {line.get_label() for line in utilisation.get_lines()} == {"kv_down", "k_up_kv_down", "v_up_kv_down", "latents"}
    assert {"attention output", "key after the norm", "spectral prediction at dc"} <= {line.get_label() for line in errors.get_lines()}
    for ax in (utilisation, errors):  # each legend sits outside the plotting area, covering no curve
        assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())


def test_analyze_full_joint_matrix_and_convert_content_joint_matrix_are_different_matrices():
    from mlaconvert.conversion.spectra import layer_spectra

    heads, hd = 3, 24
    dense = dense_attention(heads, hd)
    factors = factorize_layer(dict(dense.state_dict()), num_heads=heads, dc=16, rope_dim=12)
    wk, wv = dense.k.weight.detach().numpy(), dense.v.weight.detach().numpy()
    # analyze: every key row, balanced over all of them.
    full = np.concatenate([np.linalg.norm(wv) / np.linalg.norm(wk) * wk, wv])
    np.testing.assert_allclose(layer_spectra(dense.k.weight.detach(), dense.v.weight.detach()).kv.numpy(), np.linalg.svd(full, compute_uv=False), rtol=1e-6)
    # convert: the content pairs' key rows only, balanced over those.
    rope = {p for axis in factors.rope_pairs for p in axis}
    rows = [h * hd + d for h in range(heads) for p in range(hd // 2) if p not in rope for d in (2 * p, 2 * p + 1)]
    content = np.concatenate([np.linalg.norm(wv) / np.linalg.norm(wk[rows]) * wk[rows], wv])
    np.testing.assert_allclose(factors.kv_singular_values.numpy(), np.linalg.svd(content, compute_uv=False), rtol=1e-5)
    assert not np.allclose(np.linalg.svd(full, compute_uv=False), np.linalg.svd(content, compute_uv=False), rtol=1e-2)
