"""Shared fixtures: a tiny Wan config, its weights, and writers that put those weights on disk in every real
layout the loader accepts (native Wan, diffusers as diffusers itself saves it, training .pt, Hub cache).

    def test_x(checkpoints):                 # writer for tiny_config / tiny_state_dict under tmp_path
        folder = checkpoints.native(shards=2)
    def test_y(make_checkpoints, tmp_path):  # writer for any other config / weights
        w = make_checkpoints(config, state_dict)
    def test_z(hub_cache, checkpoints):      # an offline Hugging Face cache under tmp_path
        sha = hub_cache.add("org/name", checkpoints.native())
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.checkpoints.formats import wan_config_to_diffusers
from mlaconvert.checkpoints.naming import native_to_diffusers
from mlaconvert.modeling.config import WanConfig

# Under pytest-xdist (the README's `-n auto`) each worker stands for one core: workers of one thread each, and the
# CLI and torchrun processes the tests start inherit that. Two workers of two threads each on the 2-core CI machine
# took 289 s for the suite, one thread each 126 s.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Fields the official Wan2.1 config.json carries; everything else (patch_size, qk_norm, text_dim, ...) is left
# to the defaults, which is exactly what makes reading it non-trivial.
OFFICIAL_WAN_FIELDS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")

# Wrappers as they appear in a Self-Forcing generator trained with FSDP + activation checkpointing.
FSDP_PREFIX = "model._fsdp_wrapped_module."
BLOCK_WRAPPERS = "_fsdp_wrapped_module._checkpoint_wrapped_module."


def tiny_wan_config() -> WanConfig:
    # out_dim != in_dim and a non-default text/freq width catch swapped axes; text_len and eps stay at Wan's
    # defaults because no checkpoint stores them in the weights, so every format can round-trip the config exactly.
    return WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=4, out_dim=6, text_dim=32, freq_dim=16)


@pytest.fixture
def tiny_config() -> WanConfig:
    return tiny_wan_config()


@pytest.fixture
def tiny_state_dict(tiny_config: WanConfig) -> dict[str, torch.Tensor]:
    return make_tiny_wan(seed=1234, config=tiny_config)


@pytest.fixture
def diffusers_model(tiny_config: WanConfig):
    """diffusers' own WanTransformer3DModel with the tiny config (random weights)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**wan_config_to_diffusers(tiny_config))


def write_safetensors(folder: Path, stem: str, state_dict: Mapping[str, torch.Tensor], shards: int = 1) -> list[Path]:
    """`<stem>.safetensors`, or `<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json` as
    transformers/diffusers write them (keys split in order, index with total_size and weight_map)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        path = folder / f"{stem}.safetensors"
        save_file(dict(state_dict), path, metadata={"format": "pt"})
        return [path]
    keys = list(state_dict)
    per = math.ceil(len(keys) / shards)
    weight_map, paths = {}, []
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        paths.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


@dataclass
class CheckpointWriter:
    """Writes one model (config + native state dict) in each on-disk layout, under `root`."""

    config: WanConfig
    state_dict: dict[str, torch.Tensor]
    root: Path

    def official_config(self) -> dict:
        """config.json as Wan-AI ships it, plus any omitted field this config changes from its default."""
        full, default = self.config.to_dict(), WanConfig().to_dict()
        d = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v"}
        d.update({k: full[k] for k in full if k in OFFICIAL_WAN_FIELDS or (k != "_class_name" and full[k] != default[k])})
        return d

    def native(self, name: str = "native", shards: int = 1) -> Path:
        folder = self.root / name
        write_safetensors(folder, "diffusion_pytorch_model", self.state_dict, shards)
        (folder / "config.json").write_text(json.dumps(self.official_config(), indent=2))
        return folder

    def export(self, name: str, config: WanConfig, state_dict: Mapping[str, torch.Tensor], shards: int = 1) -> Path:
        """Any weights + `config.to_dict()` in an mlaconvert export's layout (`model*.safetensors`)."""
        folder = self.root / name
        write_safetensors(folder, "model", state_dict, shards)
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        return folder

    def diffusers(self, name: str = "diffusers", max_shard_size: str = "60KB") -> Path:
        """A pipeline root (`model_index.json` + `transformer/`) written by diffusers' own save_pretrained."""
        from diffusers import WanTransformer3DModel

        root = self.root / name
        model = WanTransformer3DModel(**wan_config_to_diffusers(self.config))
        model.load_state_dict(native_to_diffusers(self.state_dict), strict=True)
        model.save_pretrained(root / "transformer", max_shard_size=max_shard_size)
        index = {
            "_class_name": "WanPipeline",
            "_diffusers_version": "0.33.0",
            "transformer": ["diffusers", "WanTransformer3DModel"],
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2))
        return root

    def safetensors_file(self, name: str = "weights.safetensors", naming: str = "native") -> Path:
        sd = native_to_diffusers(self.state_dict) if naming == "diffusers" else self.state_dict
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(sd), path)
        return path

    def training_pt(self, name: str = "checkpoint.pt", naming: str = "native") -> Path:
        """A Self-Forcing-style checkpoint: the real weights in `generator_ema`, FSDP/checkpoint-wrapped key
        names, and a *different* `generator` so that picking the wrong one shows."""
        sd = native_to_diffusers(self.state_dict) if naming == "diffusers" else self.state_dict

        def wrapped(key: str) -> str:
            if key.startswith("blocks."):
                _, n, rest = key.split(".", 2)
                key = f"blocks.{n}.{BLOCK_WRAPPERS}{rest}"
            return FSDP_PREFIX + key

        ema = {wrapped(k): v for k, v in sd.items()}
        live = {k: v + 1.0 for k, v in ema.items()}
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"generator": live, "generator_ema": ema, "step": torch.tensor(600)}, path)
        return path


@pytest.fixture
def make_checkpoints(tmp_path: Path) -> Callable[..., CheckpointWriter]:
    def make(config: WanConfig, state_dict: dict[str, torch.Tensor], root: Path | None = None) -> CheckpointWriter:
        return CheckpointWriter(config, state_dict, root or tmp_path)

    return make


@pytest.fixture
def checkpoints(make_checkpoints, tiny_config: WanConfig, tiny_state_dict) -> CheckpointWriter:
    return make_checkpoints(tiny_config, tiny_state_dict)


class HubCache:
    """A Hugging Face cache folder laid out like huggingface_hub writes it: content-addressed blobs,
    `snapshots/<commit>/<file>` symlinks to them, and `refs/<branch>` holding the commit hash."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, repo_id: str, source: Path, branch: str | None = "main", commit: str | None = None) -> str:
        """Cache every file under `source` (a folder, or one file placed at the repo root) as a commit of
        `repo_id`; returns the 40-hex commit hash."""
        if source.is_file():
            contents = {Path(source.name): source.read_bytes()}
        else:
            contents = {p.relative_to(source): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
        tree = hashlib.sha1(repo_id.encode())
        for rel, data in contents.items():
            tree.update(str(rel).encode() + data)
        commit = commit or tree.hexdigest()
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        for rel, data in contents.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        if branch:
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / branch).write_text(commit)
        return commit


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    """An empty, offline Hub cache. huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE into its `constants`
    module at import time and consults those attributes on every call, so both the module and the
    environment (for subprocesses) are patched; the real snapshot_download/hf_hub_download code then runs."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(cache)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Run `mlaconvert ARGS` in this process through the real entry point (tests/test_hub.py runs one as a
    subprocess); much faster than a process per call."""
    from mlaconvert.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["mlaconvert", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
