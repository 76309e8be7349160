"""Rank analysis checked against numpy's float64 SVD on matrices whose spectrum is known by construction."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mlaconvert.conversion.rank import (
    REPORT_JSON,
    REPORT_PNG,
    SCHEMA,
    analyze_source,
    build_report,
    print_report,
    write_report,
)
from mlaconvert.conversion.spectra import effective_rank, key_scale, layer_spectra, truncation_at
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig

TINY = WanConfig(dim=48, ffn_dim=96, num_heads=4, num_layers=3)
CPU = torch.device("cpu")


def planted(rows: int, cols: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    """U diag(sigma) Vᵀ with random orthonormal U, V: a matrix whose singular values are exactly sigma."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sigma))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sigma))))
    return (u * sigma) @ v.T


def tiny_state_dict(config: WanConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """K/V weights with decaying spectra, K deliberately on another scale than V so balancing matters."""
    n = config.dim
    sd = {}
    for i in range(config.num_layers):
        decay = np.exp(-np.arange(n) / (4 + 3 * i))
        w_k, w_v = planted(n, n, 9.0 * decay, seed + 2 * i), planted(n, n, 0.5 * decay**0.5, seed + 2 * i + 1)
        sd[f"blocks.{i}.self_attn.k.weight"] = torch.from_numpy(w_k).float()
        sd[f"blocks.{i}.self_attn.v.weight"] = torch.from_numpy(w_v).float()
    return sd


def numpy_svals(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m.astype(np.float64), compute_uv=False)


# -- effective rank and truncation ---------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.999])
def test_effective_rank_matches_closed_form_for_geometric_spectrum(energy: float) -> None:
    # σ_i = q^i (i = 0..n-1): the first r hold (1 - q^(2r)) / (1 - q^(2n)) of the energy, so the smallest r
    # reaching `energy` is ceil(log(1 - energy (1 - q^(2n))) / log(q²)).
    n, q = 120, 0.96
    exact = math.log(1 - energy * (1 - q ** (2 * n))) / math.log(q * q)
    assert abs(exact - round(exact)) > 1e-3, "test spectrum too close to a rank boundary"
    expected = math.ceil(exact)
    sigma = q ** np.arange(n)
    assert effective_rank(sigma, energy) == expected
    # The same through the full path: a matrix with this spectrum, then the Gram-route spectrum.
    w = torch.from_numpy(planted(n, n, sigma, seed=1))
    spectra = layer_spectra(w, w, device=CPU)
    assert effective_rank(spectra.k, energy) == expected


def test_energy_one_gives_rank_of_rank_deficient_matrix() -> None:
    sigma = np.linspace(3.0, 0.5, 17)
    w = torch.from_numpy(planted(40, 40, sigma, seed=2))
    spectra = layer_spectra(w, w, device=CPU)
    assert effective_rank(spectra.k, 1.0) == 17
    assert torch.all(spectra.k[17:] == 0)
    assert effective_rank(np.zeros(5), 0.99) == 0


def test_truncation_error_is_eckart_young_optimum() -> None:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((70, 50)) @ np.diag(np.exp(-np.arange(50) / 10))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    for dc in (1, 7, 25, 49, 50):
        best = (u[:, :dc] * s[:dc]) @ vt[:dc]
        actual = np.linalg.norm(m - best) / np.linalg.norm(m)
        kept, error = truncation_at(s, dc)
        assert error == pytest.approx(actual, rel=1e-9, abs=1e-12)
        assert kept == pytest.approx(np.sum(s[:dc] ** 2) / np.sum(s**2), rel=1e-12)


def test_truncation_error_has_no_cancellation_when_almost_all_energy_is_kept() -> None:
    sigma = np.array([1.0, 1e-9])  # tail energy 1e-18: sqrt(1 - kept) would round to 0
    kept, error = truncation_at(sigma, 1)
    assert error == pytest.approx(1e-9, rel=1e-9)
    assert kept == 1.0


# -- spectra ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows_k", "rows_v", "cols"), [(48, 48, 48), (24, 40, 32), (16, 16, 64)])
def test_spectra_and_balancing_match_numpy(rows_k: int, rows_v: int, cols: int) -> None:
    rng = np.random.default_rng(4)
    w_k = 13.0 * rng.standard_normal((rows_k, cols))
    w_v = 0.2 * rng.standard_normal((rows_v, cols))
    spectra = layer_spectra(torch.from_numpy(w_k), torch.from_numpy(w_v), device=CPU)

    s = spectra.key_scale
    assert np.linalg.norm(s * w_k) == pytest.approx(np.linalg.norm(w_v), rel=1e-12)
    assert s == key_scale(torch.from_numpy(w_k), torch.from_numpy(w_v))
    # The Gram route resolves singular values to ~sqrt(n eps) σ_1.
    for ours, reference in (
        (spectra.k, numpy_svals(w_k)),
        (spectra.v, numpy_svals(w_v)),
        (spectra.kv, numpy_svals(np.vstack([s * w_k, w_v]))),
    ):
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-6 * reference[0])


def test_large_spectra_on_the_cpu_run_in_float32_and_keep_what_the_report_reads(monkeypatch) -> None:
    monkeypatch.setattr("mlaconvert.conversion.spectra.EXACT_ENTRIES", 64 * 96 - 1)  # these weights count as large
    solved = []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda gram: solved.append(gram.dtype) or eigvalsh(gram))
    rng = np.random.default_rng(6)
    w_k = 2.0 * rng.standard_normal((64, 96)) * np.geomspace(1, 1e-4, 96)
    w_v = rng.standard_normal((64, 96)) * np.geomspace(1, 1e-2, 96)
    spectra = layer_spectra(torch.from_numpy(w_k), torch.from_numpy(w_v), device=CPU)
    reference = numpy_svals(np.vstack([spectra.key_scale * w_k, w_v]))
    assert solved == [torch.float32] * 3
    # Every singular value is kept, the smallest (below 1e-3 σ_1) included: nothing real falls under the rounding bound.
    assert (spectra.k > 0).all() and (spectra.kv > 0).all()
    # float32 Grams: squared singular values to ~n eps32 of σ_1², so effective ranks and errors at dc to 1e-4.
    np.testing.assert_allclose(spectra.kv.numpy() ** 2, reference**2, rtol=0, atol=1e-5 * reference[0] ** 2)
    for energy in (0.9, 0.99):
        assert effective_rank(spectra.kv.numpy(), energy) == effective_rank(reference, energy)
    for dc in (8, 32):
        assert truncation_at(spectra.kv.numpy(), dc) == pytest.approx(truncation_at(reference, dc), abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_spectra_match_numpy() -> None:
    rng = np.random.default_rng(5)
    w_k, w_v = 3.0 * rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    spectra = layer_spectra(torch.from_numpy(w_k), torch.from_numpy(w_v), device=torch.device("cuda"))
    reference = numpy_svals(np.vstack([spectra.key_scale * w_k, w_v]))
    np.testing.assert_allclose(spectra.kv.numpy(), reference, rtol=0, atol=1e-6 * reference[0])


# -- the report ------------------------------------------------------------------------------------------------


def test_report_layers_agree_with_numpy() -> None:
    sd = tiny_state_dict()
    dc = 10
    report = build_report(TINY, sd, dc=dc, energy=0.95, source_info={"spec": "unit-test"})
    assert [layer["index"] for layer in report["layers"]] == [0, 1, 2]
    for layer in report["layers"]:
        w_k = sd[f"blocks.{layer['index']}.self_attn.k.weight"].double().numpy()
        w_v = sd[f"blocks.{layer['index']}.self_attn.v.weight"].double().numpy()
        s = np.linalg.norm(w_v) / np.linalg.norm(w_k)
        assert layer["kv"]["key_scale"] == pytest.approx(s, rel=1e-9)
        joint = np.vstack([s * w_k, w_v])
        u, sigma, vt = np.linalg.svd(joint, full_matrices=False)
        best = (u[:, :dc] * sigma[:dc]) @ vt[:dc]
        assert layer["kv"]["spectral_error_at_dc"] == pytest.approx(
            np.linalg.norm(joint - best) / np.linalg.norm(joint), rel=1e-5
        )
        assert layer["kv"]["effective_rank"] == effective_rank(sigma, 0.95)
        assert layer["k"]["effective_rank"] == effective_rank(numpy_svals(w_k), 0.95)
        np.testing.assert_allclose(layer["kv"]["singular_values"], sigma, rtol=1e-6, atol=1e-6 * sigma[0])
        for key in ("k", "v", "kv"):
            assert layer[key]["rank_budget"] == TINY.dim
            assert 0 < layer[key]["energy_at_dc"] < 1
    # Deeper layers were built with slower decay, so their effective rank grows.
    ranks = [layer["kv"]["effective_rank"] for layer in report["layers"]]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_report_without_dc_has_null_truncation_fields() -> None:
    report = build_report(TINY, tiny_state_dict())
    assert report["dc"] is None and report["cache"]["latent_content_values_per_token"] is None
    assert report["layers"][0]["kv"]["energy_at_dc"] is None
    assert report["layers"][0]["kv"]["spectral_error_at_dc"] is None


def test_written_report_is_valid_json_and_png(tmp_path: Path) -> None:
    report = build_report(TINY, tiny_state_dict(), dc=8, source_info={"spec": "unit-test", "format": "native"})
    write_report(report, tmp_path)

    data = json.loads((tmp_path / REPORT_JSON).read_text())
    assert data["schema"] == SCHEMA
    assert data["source"] == {"spec": "unit-test", "format": "native"}
    assert data["model"] == {"num_layers": 3, "dim": 48, "num_heads": 4, "head_dim": 12}
    assert data["energy"] == 0.99 and data["dc"] == 8
    assert data["device"] and isinstance(data["seconds"], float)
    assert data["cache"]["dense_values_per_token"] == 2 * 48
    assert len(data["layers"]) == 3
    for key in ("k", "v", "kv"):
        entry = data["layers"][0][key]
        fields = {"effective_rank", "rank_budget", "energy_at_dc", "spectral_error_at_dc", "singular_values"}
        assert fields <= set(entry)
        assert len(entry["singular_values"]) == 48
    assert "key_scale" in data["layers"][0]["kv"]

    png = (tmp_path / REPORT_PNG).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_JSON, REPORT_PNG]  # no temp files left


def test_print_report_shows_every_layer_and_the_summary() -> None:
    console = Console(record=True, width=140)
    print_report(build_report(TINY, tiny_state_dict(), dc=8, source_info={"spec": "unit-test"}), console)
    text = console.export_text()
    assert "[sW_K; W_V]" in text and "unit-test" in text
    assert "mean effective rank" in text and "dense cache 96 values" in text
    assert len([line for line in text.splitlines() if line.startswith("│")]) == 3


def test_display_accepts_a_per_layer_dc(tmp_path: Path) -> None:
    # A converted model's report (DESIGN §5) may record one dc per layer instead of a single value.
    report = build_report(TINY, tiny_state_dict())
    report["dc"] = [8, 16, 24]
    console = Console(record=True, width=140)
    print_report(report, console)
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    assert [row.split("│")[5].strip() for row in rows] == ["8", "16", "24"]
    write_report(report, tmp_path)
    assert (tmp_path / REPORT_PNG).read_bytes().startswith(b"\x89PNG")


# -- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dc", "energy", "message"),
    [
        (0, 0.99, "--dc must be a positive latent width, got 0"),
        (-4, 0.99, "--dc must be a positive latent width, got -4"),
        (None, 0.0, "--energy must be in (0, 1], got 0.0"),
        (None, 1.5, "--energy must be in (0, 1], got 1.5"),
        (None, float("nan"), "--energy must be in (0, 1], got nan"),
    ],
)
def test_bad_options_are_rejected(dc: int | None, energy: float, message: str) -> None:
    with pytest.raises(MlaconvertError, match=re.escape(message)):
        build_report(TINY, tiny_state_dict(), dc=dc, energy=energy)


def test_dc_above_rank_budget_names_budget_and_matrix() -> None:
    with pytest.raises(MlaconvertError, match=r"--dc 49 is above the rank budget of W_K .*= 48.*dc <= 48"):
        build_report(TINY, tiny_state_dict(), dc=49)
    assert build_report(TINY, tiny_state_dict(), dc=48)["layers"][0]["kv"]["spectral_error_at_dc"] == 0.0


def test_missing_or_misshapen_weights_are_named() -> None:
    sd = tiny_state_dict()
    del sd["blocks.2.self_attn.v.weight"]
    with pytest.raises(MlaconvertError, match=r"no 'blocks\.2\.self_attn\.v\.weight'"):
        build_report(TINY, sd)
    sd = tiny_state_dict()
    sd["blocks.1.self_attn.k.weight"] = torch.zeros(48, 40)
    with pytest.raises(MlaconvertError, match=r"'blocks\.1\.self_attn\.k\.weight' has shape \(48, 40\)"):
        build_report(TINY, sd)


def test_mla_utilisation_matches_numpy() -> None:
    from mlaconvert.conversion.spectra import mla_utilisation

    g = torch.Generator().manual_seed(3)
    dc, dim = 16, 48
    # A down-projection of rank 10 inside a budget of 16: utilisation well below 1, and computable in numpy.
    down = torch.randn(dc, 10, generator=g, dtype=torch.float64) @ torch.randn(10, dim, generator=g, dtype=torch.float64)
    weights = {
        "kv_down.weight": down,
        "k_up.weight": torch.randn(40, dc, generator=g, dtype=torch.float64),
        "v_up.weight": torch.randn(dim, dc, generator=g, dtype=torch.float64),
    }
    latents = torch.randn(200, dim, generator=g, dtype=torch.float64) @ down.T
    util = mla_utilisation(weights, latents=latents, energy=0.99)

    def numpy_rank(m: np.ndarray) -> int:
        energy = np.cumsum(np.linalg.svd(m, compute_uv=False) ** 2)
        return int(np.argmax(energy / energy[-1] >= 0.99)) + 1

    w = {k: v.numpy() for k, v in weights.items()}
    assert util["kv_down"]["effective_rank"] == numpy_rank(w["kv_down.weight"]) <= 10
    assert util["k_up_kv_down"]["effective_rank"] == numpy_rank(w["k_up.weight"] @ w["kv_down.weight"])
    assert util["v_up_kv_down"]["effective_rank"] == numpy_rank(w["v_up.weight"] @ w["kv_down.weight"])
    assert util["latents"]["effective_rank"] == numpy_rank(latents.numpy())
    assert util["kv_down"]["utilisation"] == util["kv_down"]["effective_rank"] / dc


# -- analyze_source ------------------------------------------------------------------------------------------


class FakeCheckpoint:
    def __init__(self) -> None:
        self.config = TINY
        self.state_dict = tiny_state_dict()
        self.format = "native"
        self.files = []
        self.info = {"spec": "fake/tiny", "repo_id": None, "revision": None, "path": "/nowhere", "format": "native"}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand in for mlaconvert.checkpoints.hub (the loader has its own tests); records what was loaded."""
    loaded: list[str] = []

    def load_source(spec: str, *, config=None, head_dim: int = 128, revision=None, lazy: bool = False) -> FakeCheckpoint:
        loaded.append(spec)
        return FakeCheckpoint()

    module = types.ModuleType("mlaconvert.checkpoints.hub")
    module.load_source = load_source
    monkeypatch.setitem(sys.modules, "mlaconvert.checkpoints.hub", module)
    return loaded


def test_analyze_source_writes_the_report_folder(tmp_path: Path, fake_hub: list[str]) -> None:
    out = tmp_path / "analysis"
    report = analyze_source("fake/tiny", out_dir=out, dc=8)
    assert fake_hub == ["fake/tiny"]
    assert report["source"]["spec"] == "fake/tiny"
    assert json.loads((out / REPORT_JSON).read_text())["layers"][2]["kv"] == report["layers"][2]["kv"]
    assert (out / REPORT_PNG).read_bytes().startswith(b"\x89PNG")

    with pytest.raises(MlaconvertError, match="already exists"):
        analyze_source("fake/tiny", out_dir=out, dc=8)
    assert fake_hub == ["fake/tiny"], "an existing output must be refused before loading"
    analyze_source("fake/tiny", out_dir=out, dc=4, force=True)
    assert json.loads((out / REPORT_JSON).read_text())["dc"] == 4


def test_analyze_source_validates_before_loading(tmp_path: Path, fake_hub: list[str]) -> None:
    with pytest.raises(MlaconvertError, match="--dc"):
        analyze_source("fake/tiny", out_dir=tmp_path / "a", dc=0)
    with pytest.raises(MlaconvertError, match="--energy"):
        analyze_source("fake/tiny", out_dir=tmp_path / "a", energy=2.0)
    assert fake_hub == []
    assert not (tmp_path / "a").exists()


def test_analyze_gives_identical_reports_from_every_format(cli, checkpoints, hub_cache, tmp_path) -> None:
    """The same tiny model as a native folder, a diffusers repo saved by diffusers, a Self-Forcing-style .pt and an
    offline Hub cache: one rank report, whose spectra agree with numpy."""
    pytest.importorskip("diffusers")
    native = checkpoints.native()
    hub_cache.add("org/tiny-wan", native)
    sources = {
        "native": str(native),
        "diffusers": str(checkpoints.diffusers()),
        "pt": str(checkpoints.training_pt()),
        "hub": "org/tiny-wan",
    }
    layers = {}
    for name, source in sources.items():
        r = cli("analyze", source, "--dc", "8", "--head-dim", "24", "-o", str(tmp_path / "reports" / name))
        assert r.returncode == 0, r.stderr
        layers[name] = json.loads((tmp_path / "reports" / name / "rank_report.json").read_text())["layers"]
    assert layers["native"] == layers["diffusers"] == layers["pt"] == layers["hub"]
    state = load_file(str(native / "diffusion_pytorch_model.safetensors"))
    w_k = state["blocks.0.self_attn.k.weight"].double().numpy()
    expected = np.linalg.svd(w_k, compute_uv=False)
    np.testing.assert_allclose(layers["hub"][0]["k"]["singular_values"], expected, rtol=1e-6)
