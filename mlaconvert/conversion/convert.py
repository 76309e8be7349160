"""`convert`: a dense Wan checkpoint -> an MLA model, its measured quality, and the export folder.

The pipeline: load the dense source, run a calibration pass (unless told not to), factorise every layer's
self-attention (factorize.py), assemble the MLA state dict — every tensor outside self-attention is the
source's own tensor, untouched — measure the conversion on the calibration tokens, and write the export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlaconvert import __version__
from mlaconvert.checkpoints.formats import Checkpoint
from mlaconvert.checkpoints.streaming import LazyStateDict, Overlaid, Prefixed, tensor_nbytes, total_numel
from mlaconvert.conversion.calibration import Calibration, calibrate, check_fits
from mlaconvert.conversion.factorize import LayerFactors, factorize_layer
from mlaconvert.conversion.spectra import mla_utilisation, truncation_at
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import world
from mlaconvert.fields import setting
from mlaconvert.inference.sampling import SamplerSettings, warp_timesteps
from mlaconvert.modeling.config import MLAConfig, WanConfig
from mlaconvert.modeling.attention import DenseSelfAttention, LatentSelfAttention
from mlaconvert.modeling.model import load_model
from mlaconvert.modeling.rope import AXES, Angles, rope_quota

INITS = ("svd", "asvd", "random")


@dataclass
class ConvertSettings:
    dc: int | list[int] | str = setting(
        192, "Latent width: an integer, 'auto' (per layer from --energy), a comma list, or a .json/.toml list.")
    rope_dim: int = setting(32, "Width of the shared decoupled 3D-RoPE key.")
    init: str = setting("svd", "svd (weights), asvd (activation-aware, calibrated) or random.")
    q_rank: int | None = setting(None, "Low-rank query of this rank (default: full query).")
    seed: int = setting(0, "Seed for calibration inputs and random init.")
    energy: float = setting(0.99, "Energy that defines effective ranks, and dc for --dc auto.")
    measure: bool = setting(True, "Calibration pass measuring K/V/attention error (always done for asvd).")
    calib_frames: int = 3
    calib_clips: int = 4  # world models only: clips of the world calibrated on
    calib_height: int = 16
    calib_width: int = 16


@dataclass
class Conversion:
    config: WanConfig
    state_dict: Mapping[str, torch.Tensor]  # the source's tensors outside self-attention stay where it keeps them
    layers: list[dict[str, Any]]  # per-layer measurements for the rank report
    calibration: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _layer_dcs(settings: ConvertSettings, config: WanConfig) -> list[int | None]:
    dc = settings.dc
    if dc == "auto":
        return [None] * config.num_layers
    if isinstance(dc, int):
        dc = [dc] * config.num_layers
    if len(dc) != config.num_layers:
        raise MlaconvertError(f"--dc lists {len(dc)} widths but the model has {config.num_layers} layers")
    for d in dc:
        if d <= 0 or d > config.dim:
            raise MlaconvertError(f"--dc {d} is outside the rank budget 1..{config.dim} of the joint [W_K; W_V] (dim {config.dim})")
    return list(dc)


def check_settings(settings: ConvertSettings, config: WanConfig) -> None:
    """Every option problem is reported before any heavy work starts."""
    if config.is_mla:
        raise MlaconvertError("the source is already an MLA export; convert needs a dense Wan model")
    if not config.qk_norm:
        raise MlaconvertError("convert needs a model with Wan's q/k RMS norm (qk_norm); this one has none")
    if settings.init not in INITS:
        raise MlaconvertError(f"--init must be one of {', '.join(INITS)} (got '{settings.init}')")
    if not 0 < settings.energy <= 1:
        raise MlaconvertError(f"--energy must be in (0, 1] (got {settings.energy})")
    rope_quota(config.head_dim, settings.rope_dim)
    if settings.q_rank is not None and not 0 < settings.q_rank <= config.dim:
        raise MlaconvertError(f"--q-rank {settings.q_rank} is outside 1..{config.dim} (the model dim)")
    _layer_dcs(settings, config)


def _attn_weights(state_dict: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    # By key, then looked up: a lazy state dict reads only this layer's tensors.
    prefix = f"blocks.{layer}.self_attn."
    return {k[len(prefix) :]: state_dict[k] for k in state_dict if k.startswith(prefix)}


def convert_model(
    checkpoint: Checkpoint,
    settings: ConvertSettings,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[str, int, int], None] | None = None,
    spill: Path | None = None,
) -> Conversion:
    """Factorise every layer of a dense checkpoint. `on_step(stage, done, total)` reports progress. With `spill`,
    a folder that must outlive the Conversion, each layer's factors go there as they are made (see `_spilled`)."""
    check_settings(settings, checkpoint.config)
    device = torch.device(device)
    seconds: dict[str, float] = {}
    notify = on_step or (lambda *_: None)
    calib: Calibration | None = None
    if settings.measure or settings.init == "asvd":
        with _timed(seconds, "calibration"):
            calib = _calibrate(checkpoint, settings, device, notify)
    with _timed(seconds, "factorise"):
        factors = _factorize_layers(checkpoint, settings, calib, device, notify, spill)
    mla_config = _mla_config(checkpoint, settings, factors)
    with _timed(seconds, "measure"):
        layers = _layer_records(checkpoint, factors, mla_config, settings, calib, notify)
    return Conversion(
        config=mla_config,
        state_dict=_mla_state_dict(checkpoint.state_dict, factors),
        layers=layers,
        calibration=calib.description if calib else None,
        seconds=seconds,
    )


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start


def _calibrate(checkpoint: Checkpoint, settings: ConvertSettings, device: torch.device, notify: Callable[[str, int, int], None]) -> Calibration:
    check_fits(sum(tensor_nbytes(checkpoint.state_dict, k) for k in checkpoint.state_dict), device)
    notify("calibration", 0, 1)
    config = checkpoint.config
    dense = load_model(config, checkpoint.state_dict, device=device).eval()
    sampler = SamplerSettings.for_model(config)
    calib = calibrate(dense, frames=settings.calib_frames, height=settings.calib_height, width=settings.calib_width, seed=settings.seed,
                      timesteps=tuple(warp_timesteps(sampler.timesteps, sampler.shift)), clips=_world_clips(config, settings))
    notify("calibration", 1, 1)
    return calib


def _world_clips(config: WanConfig, settings: ConvertSettings) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A model of the built-in world is calibrated on clips of its world (with their captions), not on noise."""
    if config.world is None:
        return None
    video, captions, _ = world.clips(settings.calib_clips, settings.calib_frames, settings.seed, config.world)
    return video, world.embed_captions(captions, config.text_len, config.text_dim)


def _factorize_layers(
    checkpoint: Checkpoint,
    settings: ConvertSettings,
    calib: Calibration | None,
    device: torch.device,
    notify: Callable[[str, int, int], None],
    spill: Path | None = None,
) -> list[LayerFactors]:
    config = checkpoint.config
    # One generator across the layers: a random init draws each layer's factors from where the last one stopped.
    generator = torch.Generator().manual_seed(settings.seed)
    factors = []
    for i, dc in enumerate(_layer_dcs(settings, config)):
        attn = {k: v.to(device) for k, v in _attn_weights(checkpoint.state_dict, i).items()}
        moment = calib.second_moments[i].to(device) if calib is not None and settings.init == "asvd" else None
        layer = factorize_layer(
            attn, num_heads=config.num_heads, dc=dc, rope_dim=settings.rope_dim, q_rank=settings.q_rank,
            init=settings.init, second_moment=moment, generator=generator, energy=settings.energy,
        )
        factors.append(layer if spill is None else _spilled(layer, i, spill))
        notify("factorise", i + 1, config.num_layers)
    return factors


def _mla_config(checkpoint: Checkpoint, settings: ConvertSettings, factors: list[LayerFactors]) -> WanConfig:
    config = checkpoint.config
    return config.replace(mla=MLAConfig(
        dc=tuple(f.weights["kv_down.weight"].shape[0] for f in factors),
        rope_dim=settings.rope_dim,
        nope_dim=config.head_dim - settings.rope_dim,
        q_rank=settings.q_rank,
        rope_pairs=tuple(f.rope_pairs for f in factors),
        init=settings.init,
        seed=settings.seed,
        source=_source_record(checkpoint),
        mlaconvert_version=__version__,
    ))


def _mla_state_dict(state_dict: Mapping[str, torch.Tensor], factors: list[LayerFactors]) -> Mapping[str, torch.Tensor]:
    """The dense tensors outside self-attention, left where the source keeps them, and the factors."""
    mla = Prefixed({f"blocks.{i}.self_attn.": f.weights for i, f in enumerate(factors)})
    return Overlaid(state_dict, lambda k: ".self_attn." in k, mla)


def _spilled(factors: LayerFactors, layer: int, folder: Path) -> LayerFactors:
    """The layer's factors written into `folder` and read back when needed: holding every layer's (a 14B model's
    new queries alone are 2 GB) would make memory grow with the model."""
    path = folder / f"layer-{layer:05d}.safetensors"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in factors.weights.items()}, str(path))
    return dataclasses.replace(factors, weights=LazyStateDict.of_files(path))


def _layer_records(
    checkpoint: Checkpoint,
    factors: list[LayerFactors],
    mla_config: WanConfig,
    settings: ConvertSettings,
    calib: Calibration | None,
    notify: Callable[[str, int, int], None],
) -> list[dict[str, Any]]:
    """Per layer, what the rank report adds: the choices, the spectral prediction and (calibrated) the measured errors."""
    config, mla = checkpoint.config, mla_config.mla
    assert mla is not None
    layers = []
    for i, f in enumerate(factors):
        entry: dict[str, Any] = {
            "index": i,
            "dc": mla.dc[i],
            "rope_pairs": {axis: list(pairs) for axis, pairs in zip(AXES, f.rope_pairs)},
            "rope_energy_kept": f.rope_energy_kept,
            "key_scale": f.key_scale,
            "cached_values_per_token": {"dense": config.kv_values_per_token(), "mla": mla_config.kv_values_per_token(i)},
        }
        energy_at, error_at = truncation_at(f.kv_singular_values.numpy(), mla.dc[i])
        entry["spectral_prediction"] = {"energy_at_dc": energy_at, "spectral_error_at_dc": error_at, "weighted": settings.init == "asvd"}
        if calib is not None:
            entry["measured"] = measure_layer(_attn_weights(checkpoint.state_dict, i), f, calib.samples[i], config, mla_config, i)
        layers.append(entry)
        notify("measure", i + 1, config.num_layers)
    return layers


@torch.no_grad()
def measure_layer(
    dense_weights: dict[str, torch.Tensor],
    factors: LayerFactors,
    samples: list[tuple[torch.Tensor, Angles]],
    config: WanConfig,
    mla_config: WanConfig,
    layer: int,
) -> dict[str, Any]:
    """Relative errors on calibration tokens (float32) of the pre-norm keys (k), the keys as attention sees them
    after the per-token norm and its weight (k_normed: what the key-scale form `k_rope_norm` decides), the
    values and the attention output."""
    dense = DenseSelfAttention(config).float()
    dense.load_state_dict({k: v.float() for k, v in dense_weights.items()})
    latent = LatentSelfAttention(mla_config, layer).float()
    latent.load_state_dict({k: v.float() for k, v in factors.weights.items()})
    key_shape = (config.num_heads, config.head_dim // 2, 2)
    g_k = dense.norm_k.weight.view(key_shape)
    num = dict.fromkeys(("k", "k_normed", "v", "attn"), 0.0)
    den = dict.fromkeys(num, 0.0)
    latents = []
    for x, angles in samples:
        k_true = dense.k(x).view(*x.shape[:-1], *key_shape)
        entries = latent.entries(x)
        latents.append(entries[0].reshape(-1, entries[0].shape[-1]))
        k_hat, scale = dense_layout_keys(latent, entries, factors.rope_pairs, g_k)
        kn_true, kn_hat = dense.norm_k(dense.k(x)).view_as(k_true), k_hat * scale.unsqueeze(-1).unsqueeze(-1) * g_k
        v_true, v_hat = dense.v(x), latent.v_up(entries[0])
        a_true, a_hat = dense(x, angles), latent(x, angles)
        pairs = {"k": (k_true, k_hat), "k_normed": (kn_true, kn_hat), "v": (v_true, v_hat), "attn": (a_true, a_hat)}
        for key, (t, e) in pairs.items():
            num[key] += float((t - e).pow(2).sum())
            den[key] += float(t.pow(2).sum())
    out: dict[str, Any] = {f"{k}_error": math.sqrt(num[k] / den[k]) if den[k] else 0.0 for k in num}
    out["latents"] = torch.cat(latents)
    return out


def dense_layout_keys(
    latent: LatentSelfAttention, entries: tuple[torch.Tensor, ...], rope_pairs: Sequence[Sequence[int]], g_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm dense key a latent layer stands for, (..., H, head_dim/2, 2) in the dense layer's pair order,
    and the per-token key scale s (..., 1). g_k: Wan's key-norm weight as (H, head_dim/2, 2); r carries it on the
    rope dims, so it is divided out there to compare with the dense W_K x + b_K."""
    rope = [p for axis in rope_pairs for p in axis]
    content = [p for p in range(g_k.shape[1]) if p not in set(rope)]
    keys, scale = latent.head_keys(entries)
    k_hat = keys.new_empty(*keys.shape[:-1], *g_k.shape[1:])
    k_hat[..., content + rope, :] = keys.unflatten(-1, (-1, 2))
    k_hat[..., rope, :] /= g_k[:, rope]
    return k_hat, scale


def _source_record(checkpoint: Checkpoint) -> dict[str, Any]:
    info = checkpoint.info or {}
    return {
        "repo": info.get("repo_id") or info.get("spec"),
        "revision": info.get("revision"),
        "format": checkpoint.format,
        "path": str(info.get("path", "")),
        "sha256": weights_sha256(checkpoint.files),
    }


def weights_sha256(files: list[Path]) -> str | None:
    """SHA-256 over the weight files in order; a Hub cache blob is named by its hash already, so it is reused."""
    if not files:
        return None
    digests = []
    for f in files:
        target = Path(f).resolve()
        if re.fullmatch(r"[0-9a-f]{64}", target.name):
            digests.append(target.name)
            continue
        h = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def conversion_report(checkpoint: Checkpoint, conversion: Conversion, settings: ConvertSettings) -> dict[str, Any]:
    """The analyze report of the dense source, extended per layer with what the conversion did and measured."""
    from mlaconvert.conversion.rank import build_report

    dcs = conversion.config.mla.dc
    uniform = dcs[0] if len(set(dcs)) == 1 else None
    report = build_report(checkpoint.config, checkpoint.state_dict, dc=uniform, energy=settings.energy, source_info=checkpoint.info)
    for entry, layer in zip(report["layers"], conversion.layers):
        measured = dict(layer.get("measured", {}))
        latents = measured.pop("latents", None)
        weights = _attn_weights(conversion.state_dict, layer["index"])
        mla = {k: v for k, v in layer.items() if k not in ("index", "measured")}
        if measured:
            mla["measured"] = measured
        mla["utilisation"] = mla_utilisation(weights, latents=latents, energy=settings.energy)
        entry["mla"] = mla
    mla_values = [conversion.config.kv_values_per_token(i) for i in range(len(dcs))]
    dense_total = checkpoint.config.kv_values_per_token() * checkpoint.config.num_layers
    mla_total = sum(mla_values)
    report["dc"] = uniform if uniform is not None else list(dcs)
    report["cache"].update({
        "rope_dim": conversion.config.mla.rope_dim,
        "mla_values_per_token": mla_values,
        "dense_values_per_token_all_layers": dense_total,
        "mla_values_per_token_all_layers": mla_total,
        "reduction": 1 - mla_total / dense_total,
    })
    report["conversion"] = {
        "init": settings.init,
        "rope_dim": settings.rope_dim,
        "q_rank": settings.q_rank,
        "seed": settings.seed,
        "calibration": conversion.calibration,
        "seconds": {k: round(v, 3) for k, v in conversion.seconds.items()},
    }
    return report


def convert_source(
    source: str,
    output: str | Path,
    settings: ConvertSettings,
    *,
    force: bool = False,
    config: str | None = None,
    head_dim: int = 128,
    device: str | None = None,
) -> tuple[Conversion, dict[str, Any]]:
    """Load SOURCE, convert it, and write the export folder `output` (atomically; refuses to overwrite without force).

    The returned Conversion's config and layers stay valid; its tensors were read from folders that are gone once
    the export is written (read the export instead)."""
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.conversion.export import write_export
    from mlaconvert.devices import choose_device
    from mlaconvert.outputs import check_writable, claim_output
    from mlaconvert.progress import progress_bar

    output = Path(output)
    check_writable(output, force)
    checkpoint = load_source(source, config=config, head_dim=head_dim, lazy=True)
    check_settings(settings, checkpoint.config)
    claim_output(output, force)  # from here until this process ends, a second convert into `output` refuses
    dev = choose_device(device, total_numel(checkpoint.state_dict))
    start = time.perf_counter()
    with progress_bar() as progress:
        tasks: dict[str, Any] = {}

        def on_step(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        output.parent.mkdir(parents=True, exist_ok=True)
        for stale in output.parent.glob(f".{output.name}.factors-*"):  # a killed convert's; claim_output made us the only writer
            shutil.rmtree(stale, ignore_errors=True)
        spill = Path(tempfile.mkdtemp(prefix=f".{output.name}.factors-", dir=output.parent))
        try:
            conversion = convert_model(checkpoint, settings, device=dev, on_step=on_step, spill=spill)
            report = conversion_report(checkpoint, conversion, settings)
            report["conversion"]["seconds"]["total"] = round(time.perf_counter() - start, 3)
            report["conversion"]["device"] = str(dev)
            report["export"] = str(output)
            write_export(output, conversion.config, conversion.state_dict, report, force=force)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    return conversion, report
