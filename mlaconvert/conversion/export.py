"""The export folder of a converted (or fine-tuned) model: weights, config, rank report and a model card.

The folder is itself a valid SOURCE: `model.safetensors` (or shards + `model.safetensors.index.json` above
5 GB) under Wan's native names, `config.json` with the dense fields plus the `mla` block. It is written into
a temporary sibling and renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlaconvert import __version__
from mlaconvert.checkpoints.streaming import shard_plan, tensor_nbytes, tensor_spec, total_numel, write_safetensors
from mlaconvert.conversion.rank import write_report
from mlaconvert.modeling.config import WanConfig
from mlaconvert.outputs import atomic_dir

SHARD_BYTES = 5 * 2**30


def save_weights(state_dict: Mapping[str, torch.Tensor], folder: Path, *, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than `shard_bytes`; written
    shard by shard and tensor by tensor, so a lazy state dict is never in memory whole."""
    metadata = {"format": "pt", "mlaconvert_version": __version__}
    names = sorted(state_dict)
    sizes = {name: tensor_nbytes(state_dict, name) for name in names}
    shards = shard_plan(sizes, shard_bytes)
    paths = [folder / "model.safetensors"] if len(shards) == 1 else [
        folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for path, shard in zip(paths, shards, strict=True):
        specs = [(name, *tensor_spec(state_dict, name)) for name in shard]
        write_safetensors(path, specs, lambda name: state_dict[name], metadata=metadata)
    if len(shards) > 1:
        weight_map = {name: path.name for path, shard in zip(paths, shards) for name in shard}
        index = {"metadata": {"total_size": sum(sizes.values()), **metadata}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


PLACEHOLDER = "<this folder>"  # where the card's commands name the export itself
UMT5_WIDTH = 4096  # width of Wan's umT5-XXL prompt embeddings: a model with another text_dim cannot read real prompts


def model_card(config: WanConfig, report: Mapping[str, Any], params: int) -> str:
    """A Hub-style README for the export, built only from its own records (config.json's `mla` block and the
    rank report); a fact the records do not hold is left out rather than guessed. `params`: the weights' size,
    which decides the suggested sample command."""
    mla = config.mla
    assert mla is not None
    src = {k: v for k, v in mla.source.items() if v not in (None, "")}
    dense = config.replace(mla=None).kv_values_per_token()
    latent = [config.kv_values_per_token(i) for i in range(config.num_layers)]
    mean_latent = sum(latent) / len(latent)
    dc_text = str(mla.dc[0]) if len(set(mla.dc)) == 1 else f"per layer {list(mla.dc)}"
    known = ", ".join(f"{key} `{src[key]}`" for key in ("revision", "format", "sha256") if key in src)
    front = f"base_model: {src['repo']}\n" if "repo" in src else ""
    notes = "".join(text + "\n\n" for text in (_conversion_text(report), _finetune_text(report)) if text)
    return f"""---
library_name: mlaconvert
tags: [video-diffusion, wan2.1, multi-head-latent-attention, kv-cache]
{front}---

# {Path(str(src.get('repo', 'model'))).name} — MLA (dc {dc_text}, rope {mla.rope_dim})

A Multi-Head Latent Attention version of a Wan2.1-architecture DiT, made by `mlaconvert {mla.mlaconvert_version}`
with `--init {mla.init}` (seed {mla.seed}). Self-attention caches one content latent (dc values) and one shared,
unrotated 3D-RoPE key ({mla.rope_dim} values) per token and layer; every other weight is the source's own.

| | dense | MLA |
|---|---|---|
| cached values per token per layer | {dense} | {mean_latent:g} |
| KV bytes per token, all {config.num_layers} layers, bf16 | {dense * 2 * config.num_layers:,} | {int(sum(latent)) * 2:,} |
| reduction | | {100 * (1 - mean_latent / dense):.1f}% |

Source: `{src.get('repo', 'unknown')}`{f" ({known})" if known else ""}.
Model: dim {config.dim}, {config.num_heads} heads x {config.head_dim}, {config.num_layers} layers; nope dim {mla.nope_dim},
q rank {mla.q_rank or 'full'}.

{notes}```
{sample_command(config, params)}
```
"""


def _conversion_text(report: Mapping[str, Any]) -> str:
    """The calibration and measured errors the conversion recorded; a fine-tuned export's report has neither,
    and its card leaves them out (they described the weights before training)."""
    conversion = report.get("conversion")
    if conversion is None:
        return ""
    calibration = conversion.get("calibration")
    if not calibration:
        return "No calibration pass was run (`--no-measure`), so no measured errors are recorded."
    attn_err = [layer["mla"]["measured"]["attn_error"] for layer in report["layers"] if "measured" in layer.get("mla", {})]
    weighting = " and weighted the factorisation by their second moments (asvd)" if conversion.get("init") == "asvd" else ""
    return (
        f"A calibration pass ran the dense model on {calibration['tokens']:,} tokens (seed {calibration['seed']}; "
        f"inputs: {calibration['inputs']}){weighting}. Mean relative attention-output error on those tokens: "
        f"{sum(attn_err) / len(attn_err):.4f} (worst layer {max(attn_err):.4f}); see `rank_report.json` for K/V errors, "
        "spectra and rank utilisation."
    )


def _finetune_text(report: Mapping[str, Any]) -> str:
    """What fine-tuning did, from the report's `finetune` section; without one, the advice to fine-tune."""
    info = report.get("finetune")
    if info is None:
        return "A conversion alone loses quality; fine-tune briefly from the dense teacher (`mlaconvert finetune`) before use."
    before, after = info["before"]["agreement"], info["after"]["agreement"]
    teacher = info["teacher"].get("source")
    return (
        f"Fine-tuned for {info['steps']:,} steps from the dense teacher{f' `{teacher}`' if teacher else ''}. "
        f"Agreement with the teacher on {after['clips']} held-out clips, before -> after: flow relative error "
        f"{before['flow_relative_error_mean']:.4f} -> {after['flow_relative_error_mean']:.4f}, rollout PSNR "
        f"{before['rollout_psnr_db_mean']:.2f} -> {after['rollout_psnr_db_mean']:.2f} dB."
    )


def parameter_count(config: WanConfig) -> int:
    """Parameters of a model of this config, without allocating it."""
    from mlaconvert.modeling.model import WanModel

    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(config).parameters())


def sample_command(config: WanConfig, params: int, folder: str = PLACEHOLDER, output: str = "video") -> str:
    """A `sample` command that works for this model as written: its own kind of prompt, and for a small model
    the CPU and one chunk of frames, at the model's own frame size (sample's default)."""
    from mlaconvert.devices import FULL_SIZE_PARAMS

    args = ["mlaconvert", "sample", folder]
    if config.text_encoder == "captions":
        args += ["--prompt", "two balls: red, blue"]
    elif config.text_dim != UMT5_WIDTH:
        args.append("--random-text")
    else:
        args += ["--prompt", "a red fox running through fresh snow"]
    if params <= FULL_SIZE_PARAMS:
        args += ["--device", "cpu", "--frames", str(config.sampler.chunk)]
    return " ".join(a if a == PLACEHOLDER else shlex.quote(a) for a in [*args, "-o", output])


def next_steps(folder: Path) -> str:
    """What to run on the export written to `folder`: its sample command, and eval for a world model."""
    config = WanConfig.from_dict(json.loads((folder / "config.json").read_text()))
    steps = sample_command(config, parameter_count(config), str(folder), f"{folder}-sample")
    if config.world is not None:  # eval draws fresh clips of the model's world; others need --data
        steps += f" or {shlex.join(['mlaconvert', 'eval', str(folder), '-o', f'{folder}-eval'])}"
    return steps


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
        (tmp / "README.md").write_text(model_card(config, report, total_numel(state_dict)))
    return folder
