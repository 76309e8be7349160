"""The export folder of a converted (or fine-tuned) model: weights, config, rank report and a model card.

The folder is itself a valid SOURCE: `model.safetensors` (or shards + `model.safetensors.index.json` above
5 GB) under Wan's native names, `config.json` with the dense fields plus the `mla` block. It is written into
a temporary sibling and renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlaconvert import __version__
from mlaconvert.config import WanConfig
from mlaconvert.outputs import atomic_dir
from mlaconvert.rank import write_report

SHARD_BYTES = 5 * 2**30


def _shards(state_dict: Mapping[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state_dict):
        t = state_dict[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    return shards


def save_weights(state_dict: Mapping[str, torch.Tensor], folder: Path, *, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than `shard_bytes`."""
    metadata = {"format": "pt", "mlaconvert_version": __version__}
    shards = _shards(state_dict, shard_bytes)
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def model_card(config: WanConfig, report: Mapping[str, Any]) -> str:
    """A Hub-style README for the export: what it is, how it was made, what its cache costs."""
    mla = config.mla
    assert mla is not None
    src = mla.source
    dense = 2 * config.dim
    latent = [d + mla.rope_dim for d in mla.dc]
    mean_latent = sum(latent) / len(latent)
    layers = report.get("layers", [])
    attn_err = [layer["measured"]["attn_error"] for layer in layers if "measured" in layer]
    quality = (
        f"Mean relative attention-output error on calibration tokens: {sum(attn_err) / len(attn_err):.4f} "
        f"(worst layer {max(attn_err):.4f}); see `rank_report.json` for K/V errors, spectra and rank utilisation."
        if attn_err
        else "No calibration pass was run, so no measured errors are recorded."
    )
    dc_text = str(mla.dc[0]) if len(set(mla.dc)) == 1 else f"per layer {list(mla.dc)}"
    return f"""---
library_name: mlaconvert
tags: [video-diffusion, wan2.1, multi-head-latent-attention, kv-cache]
base_model: {src.get('repo') or 'unknown'}
---

# {Path(str(src.get('repo') or 'model')).name} — MLA (dc {dc_text}, rope {mla.rope_dim})

A Multi-Head Latent Attention version of a Wan2.1-architecture DiT, made by `mlaconvert {mla.mlaconvert_version}`
with `--init {mla.init}` (seed {mla.seed}). Self-attention caches one content latent (dc values) and one shared,
unrotated 3D-RoPE key ({mla.rope_dim} values) per token and layer; every other weight is the source's own.

| | dense | MLA |
|---|---|---|
| cached values per token per layer | {dense} | {mean_latent:g} |
| KV bytes per token, all {config.num_layers} layers, bf16 | {dense * 2 * config.num_layers:,} | {int(sum(latent)) * 2:,} |
| reduction | | {100 * (1 - mean_latent / dense):.1f}% |

Source: `{src.get('repo')}` (revision `{src.get('revision')}`, format `{src.get('format')}`, sha256 `{src.get('sha256')}`).
Model: dim {config.dim}, {config.num_heads} heads x {config.head_dim}, {config.num_layers} layers; nope dim {mla.nope_dim},
q rank {mla.q_rank or 'full'}.

{quality}

A conversion alone loses quality; fine-tune briefly from the dense teacher (`mlaconvert finetune`) before use.

```
mlaconvert sample <this folder> --prompt "..." --seconds 10 -o video
```
"""


def write_export(
    folder: str | Path,
    config: WanConfig,
    state_dict: Mapping[str, torch.Tensor],
    report: Mapping[str, Any],
    *,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    folder = Path(folder)
    with atomic_dir(folder, force) as tmp:
        save_weights(state_dict, tmp, shard_bytes=shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_report(report, tmp)
        (tmp / "README.md").write_text(model_card(config, report))
    return folder
