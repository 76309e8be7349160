"""SOURCE resolution against a real (offline) Hugging Face cache, builtins and local paths."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx2
import pytest
import torch
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

from mlaconvert.checkpoints import hub
from mlaconvert.checkpoints.builtin import TINY_WAN, make_tiny_wan
from mlaconvert.checkpoints.hub import TRANSFORMER_PATTERNS, load_source, resolve_source
from mlaconvert.errors import MlaconvertError

# File lists of the real repos (trimmed of docs/assets), to check what a snapshot would fetch.
WAN_1_3B_FILES = [
    ".gitattributes", "LICENSE.txt", "README.md", "Wan2.1_VAE.pth", "config.json", "diffusion_pytorch_model.safetensors",
    "google/umt5-xxl/special_tokens_map.json", "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json",
    "google/umt5-xxl/tokenizer_config.json", "models_t5_umt5-xxl-enc-bf16.pth", "assets/comp_effic.png",
]
WAN_1_3B_DIFFUSERS_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model-00001-of-00005.safetensors", "text_encoder/model.safetensors.index.json",
    "tokenizer/spiece.model", "tokenizer/tokenizer.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def fetched(files: list[str]) -> list[str]:
    return sorted(filter_repo_objects(items=files, allow_patterns=TRANSFORMER_PATTERNS))


def test_snapshot_patterns_fetch_only_the_transformer():
    assert fetched(WAN_1_3B_FILES) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert fetched(WAN_1_3B_DIFFUSERS_FILES) == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]
    export = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "rank_report.json", "rank_report.png", "README.md"]
    assert fetched(export) == sorted(set(export) - {"rank_report.png", "README.md"})


# --- builtin and local ----------------------------------------------------------------------------------


def test_builtin_tiny_wan():
    ckpt = load_source("builtin:tiny-wan")
    assert ckpt.config == TINY_WAN and ckpt.format == "wan"
    assert ckpt.info["kind"] == "builtin" and ckpt.info["repo_id"] is None
    assert torch.equal(ckpt.state_dict["head.head.weight"], make_tiny_wan(0)["head.head.weight"])


def test_unknown_builtin():
    with pytest.raises(MlaconvertError, match="unknown builtin model 'huge-wan'; builtins: builtin:tiny-wan"):
        resolve_source("builtin:huge-wan")


def test_existing_local_path_wins_over_a_repo_id(checkpoints, hub_cache, monkeypatch, tmp_path):
    checkpoints.native("org/name")
    monkeypatch.chdir(tmp_path)
    src = resolve_source("org/name")
    assert src.kind == "local" and src.path.resolve() == (tmp_path / "org" / "name").resolve()


@pytest.mark.parametrize("spec", ["/no/such/path", "./missing", "~/definitely-missing.pt", "no-slash-name"])
def test_missing_local_path(spec, hub_cache):
    with pytest.raises(MlaconvertError, match=r"^no such file or folder: '.*'$"):
        load_source(spec)


# --- the offline Hub cache ------------------------------------------------------------------------------


@pytest.fixture
def cached_native(hub_cache, checkpoints):
    """org/tiny-wan in the cache: a native checkpoint plus what the real repo also has (a VAE, a text encoder)."""
    folder = checkpoints.native("repo")
    (folder / "Wan2.1_VAE.pth").write_bytes(b"vae")
    return hub_cache.add("org/tiny-wan", folder)


@pytest.mark.parametrize("form", ["plain", "branch", "commit", "revision-argument"])
def test_cached_repo_loads_offline(form, cached_native, tiny_config, tiny_state_dict):
    spec, revision = {
        "plain": ("org/tiny-wan", None),
        "branch": ("org/tiny-wan@main", None),
        "commit": (f"org/tiny-wan@{cached_native}", None),
        "revision-argument": ("org/tiny-wan", cached_native),
    }[form]
    ckpt = load_source(spec, revision=revision)
    assert ckpt.config == tiny_config and ckpt.format == "wan"
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in tiny_state_dict.items())
    assert ckpt.info["repo_id"] == "org/tiny-wan" and ckpt.info["commit"] == cached_native
    assert ckpt.info["spec"] == spec and ckpt.info["format"] == "wan"
    assert ckpt.info["path"].endswith(f"snapshots/{cached_native}")


def test_cached_diffusers_repo(hub_cache, checkpoints, tiny_config, tiny_state_dict):
    sha = hub_cache.add("org/tiny-wan-diffusers", checkpoints.diffusers())
    ckpt = load_source("org/tiny-wan-diffusers")
    assert ckpt.format == "diffusers" and ckpt.config == tiny_config and ckpt.info["commit"] == sha
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in tiny_state_dict.items())


@pytest.mark.parametrize("with_revision", [False, True])
def test_file_inside_a_cached_repo(with_revision, hub_cache, checkpoints, tiny_config, tiny_state_dict, tmp_path):
    repo = tmp_path / "self-forcing"
    (repo / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints.training_pt(), repo / "checkpoints" / "self_forcing_dmd.pt")
    sha = hub_cache.add("gdhe17/Self-Forcing", repo)
    spec = f"gdhe17/Self-Forcing{'@' + sha if with_revision else ''}/checkpoints/self_forcing_dmd.pt"
    ckpt = load_source(spec, head_dim=tiny_config.head_dim)
    assert ckpt.format == "training" and ckpt.config == tiny_config
    assert ckpt.info["state_key"] == "generator_ema" and ckpt.info["commit"] == sha
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in tiny_state_dict.items())


def test_repo_not_in_cache_offline(hub_cache):
    with pytest.raises(MlaconvertError) as e:
        load_source("Wan-AI/Wan2.1-T2V-1.3B")
    assert str(e.value) == (
        f"'Wan-AI/Wan2.1-T2V-1.3B' is not in the local Hugging Face cache (HF_HUB_CACHE={hub_cache.root}) and the Hub "
        "cannot be reached (offline): download it once with network, or pass a local folder"
    )


def test_unknown_revision_lists_the_cached_ones(cached_native):
    with pytest.raises(MlaconvertError) as e:
        load_source("org/tiny-wan@v2")
    message = str(e.value)
    assert message.startswith("'org/tiny-wan@v2' is not in the local Hugging Face cache")
    assert message.endswith(f"(cached revisions: {cached_native[:12]}, main)")


def test_missing_file_in_cached_repo(cached_native):
    with pytest.raises(MlaconvertError, match=r"^'org/tiny-wan/checkpoints/x.pt' is not in the local Hugging Face cache"):
        load_source("org/tiny-wan/checkpoints/x.pt")


def test_cached_repo_without_transformer_weights(hub_cache, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("checkpoints live in checkpoints/")
    hub_cache.add("gdhe17/Self-Forcing", tmp_path / "repo")
    with pytest.raises(MlaconvertError, match="has no transformer weights at its root or in transformer/; name a checkpoint"):
        load_source("gdhe17/Self-Forcing")


def test_conflicting_revisions():
    with pytest.raises(MlaconvertError, match="names revision 'v1' but revision 'v2' was also given"):
        resolve_source("org/name@v1", revision="v2")


# The online failures cannot happen without a network, so hf_hub_download raises them as the Hub would
# (huggingface_hub 2.x builds its errors on httpx2 responses).
def _http_error(cls, message):
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    return cls(message, response=response)


@pytest.mark.parametrize(
    "error, expected",
    [
        (_http_error(RepositoryNotFoundError, "404 Repository Not Found"), "no Hub repo 'org/name' (or it is private"),
        (_http_error(RevisionNotFoundError, "404 Revision Not Found"), "Hub repo 'org/name' has no revision 'v9'"),
        (
            _http_error(RemoteEntryNotFoundError, "404 Entry Not Found"),
            "Hub repo 'org/name' at revision 'v9' has no file 'a/b.pt'",
        ),
    ],
)
def test_hub_not_found_errors_say_which(error, expected, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    with pytest.raises(MlaconvertError, match=expected.replace("(", r"\(")):
        resolve_source("org/name@v9/a/b.pt")


# --- through the CLI process ----------------------------------------------------------------------------


def test_cli_reports_a_missing_source_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlaconvert", "analyze", "/no/such/path", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: no such file or folder: '/no/such/path'"]
    assert not (tmp_path / "out").exists()
