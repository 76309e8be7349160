"""Checkpoint formats: read any supported layout into one canonical form (native Wan names, DESIGN §2).

Supported inputs, all recognised by their contents (tensor names, config fields, file magic), never by file name:
  * native Wan folder: `config.json` (`WanModel`) + `diffusion_pytorch_model[-0000i-of-0000n].safetensors`;
  * mlaconvert export: `config.json` with an `mla` block + `model[-0000i-of-0000n].safetensors`;
  * diffusers: a pipeline root with `transformer/`, or the transformer folder itself (`WanTransformer3DModel`);
  * a single `.safetensors` file in native or diffusers naming;
  * a training checkpoint (`.pt`) of Self-Forcing / CausVid / LongLive / Rolling Forcing.
Tensors are kept in their stored dtype; safetensors are memory-mapped, so a 5.7 GB fp32 model is not copied
into RAM before a caller touches it. The tensor names themselves (shapes, key maps, wrappers) are in naming.py.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlaconvert.checkpoints.naming import detect_naming, diffusers_to_native, diffusers_to_native_keys, native_shapes, strip_wrappers
from mlaconvert.checkpoints.streaming import LazyStateDict, tensor_spec
from mlaconvert.errors import MlaconvertError
from mlaconvert.fields import check_types
from mlaconvert.modeling.config import PRESETS, SamplerDefaults, WanConfig, preset
from mlaconvert.outputs import atomic_file, write_json

# Sub-dicts of a training checkpoint that may hold the generator, best first: the EMA weights are what
# Self-Forcing and friends evaluate and release.
TRAINING_STATE_KEYS = ("generator_ema", "generator", "model", "state_dict")

_EXAMPLE_KEYS = ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight")


@dataclass
class Checkpoint:
    """A dense (or MLA) Wan DiT in canonical native names, plus where it came from."""

    config: WanConfig
    state_dict: dict[str, torch.Tensor]
    format: str  # wan, diffusers, training or mlaconvert
    files: list[Path]  # the tensor files read, in shard order
    info: dict[str, Any] = field(default_factory=dict)


# --- configs --------------------------------------------------------------------------------------------


def diffusers_config_to_wan(d: Mapping[str, Any]) -> WanConfig:
    """A `WanTransformer3DModel` config.json as a WanConfig; the image-to-video variant is refused."""
    if d.get("image_dim") is not None or d.get("added_kv_proj_dim") is not None:
        raise MlaconvertError(
            "this is a Wan image-to-video transformer (image_dim/added_kv_proj_dim set); only text-to-video Wan2.1 "
            "models are supported"
        )
    required = ("num_attention_heads", "attention_head_dim", "in_channels", "ffn_dim", "num_layers")
    missing = [k for k in required if k not in d]
    if missing:
        raise MlaconvertError(f"diffusers config lacks {', '.join(missing)}")
    heads = int(d["num_attention_heads"])
    # Fields a saved config may omit fall back to WanTransformer3DModel's own defaults, as diffusers would.
    return WanConfig(
        dim=heads * int(d["attention_head_dim"]),
        ffn_dim=int(d["ffn_dim"]),
        num_heads=heads,
        num_layers=int(d["num_layers"]),
        in_dim=int(d["in_channels"]),
        out_dim=int(d.get("out_channels") or d["in_channels"]),
        patch_size=tuple(int(p) for p in d.get("patch_size", (1, 2, 2))),
        text_dim=int(d.get("text_dim", 4096)),
        freq_dim=int(d.get("freq_dim", 256)),
        eps=float(d.get("eps", 1e-6)),
        # WanAttention builds and applies norm_q/norm_k whatever `qk_norm` says, so the weights always have them.
        qk_norm=True,
        cross_attn_norm=bool(d.get("cross_attn_norm", False)),
    )


def wan_config_to_diffusers(config: WanConfig) -> dict[str, Any]:
    """Constructor arguments of an equivalent `WanTransformer3DModel` (the inverse of diffusers_config_to_wan)."""
    if not config.qk_norm:
        raise MlaconvertError("diffusers' WanTransformer3DModel always normalises q and k; this model has no qk_norm")
    return {
        "patch_size": tuple(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
    }


def config_from_dict(d: Mapping[str, Any], where: str = "config.json") -> WanConfig:
    """Parse a native Wan, mlaconvert or diffusers transformer config, told apart by its fields."""
    if d.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in d:
        return diffusers_config_to_wan(d)
    if "dim" not in d:
        raise MlaconvertError(f"'{where}' is not a Wan transformer config (no 'dim' or 'num_attention_heads' field)")
    if d.get("model_type", "t2v") != "t2v":
        raise MlaconvertError(f"'{where}' describes a Wan {d['model_type']} model; only text-to-video (t2v) is supported")
    check_types(WanConfig, d, where)
    if isinstance(d.get("sampler"), dict):
        check_types(SamplerDefaults, d["sampler"], f"{where}: sampler")
    return WanConfig.from_dict(dict(d))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlaconvertError(f"could not read '{path}': {e}") from e
    if not isinstance(data, dict):
        raise MlaconvertError(f"'{path}' does not hold a JSON object")
    return data


def resolve_config(config: WanConfig | str | Path) -> WanConfig:
    """A WanConfig from a WanConfig, a preset name, a config.json, or a folder holding one."""
    if isinstance(config, WanConfig):
        return config
    if isinstance(config, str) and config.lower() in PRESETS:
        return preset(config)
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MlaconvertError(f"config '{config}' is neither a preset ({', '.join(PRESETS)}) nor an existing config.json")
    return config_from_dict(_read_json(path), str(path))


def infer_config(sd: Mapping[str, torch.Tensor], head_dim: int = 128) -> WanConfig:
    """Recover the dense config from tensor shapes (native names). Heads are not visible in the weights,
    so num_heads = dim // head_dim; text_len and eps are not either and keep Wan's defaults."""
    required = (
        "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight",
        "head.head.weight",
    )
    if any(k not in sd for k in required):
        raise MlaconvertError(f"cannot infer the model config: {_not_wan_message(sd.keys())}")
    dim, in_dim, *patch = sd["patch_embedding.weight"].shape
    if len(patch) != 3:
        shape = tuple(sd["patch_embedding.weight"].shape)
        raise MlaconvertError(f"patch_embedding.weight has shape {shape}; expected a 3D convolution's 5 dims")
    if dim % head_dim:
        raise MlaconvertError(
            f"cannot infer num_heads: dim {dim} is not divisible by head_dim {head_dim}; pass the right head dim or a config"
        )
    layers = {int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return WanConfig(
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        num_heads=dim // head_dim,
        num_layers=max(layers) + 1,
        in_dim=in_dim,
        out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
        patch_size=tuple(patch),
        text_dim=sd["text_embedding.0.weight"].shape[1],
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
    )


# --- validation -----------------------------------------------------------------------------------------


def _sample(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} keys)" if len(keys) > n else shown


def _not_wan_message(keys: Iterable[str]) -> str:
    keys = list(keys)
    found = _sample(keys) if keys else "no tensors"
    return f"expected keys like {', '.join(_EXAMPLE_KEYS)}; found {found}"


def validate_state_dict(sd: Mapping[str, torch.Tensor], config: WanConfig, name: str) -> None:
    """Raise one line naming missing, unexpected and misshapen tensors. For an MLA model only the weights
    outside self-attention are checked here (plus kv_down); the model's strict load checks the rest."""
    expected: dict[str, tuple[int, ...] | None] = dict(native_shapes(config))
    keys = set(sd)
    if config.is_mla:
        expected = {k: s for k, s in expected.items() if ".self_attn." not in k}
        expected.update({f"blocks.{i}.self_attn.kv_down.weight": None for i in range(config.num_layers)})
        keys = {k for k in keys if ".self_attn." not in k or k.endswith(".self_attn.kv_down.weight")}
    missing = expected.keys() - keys
    unexpected = keys - expected.keys()
    if not keys & expected.keys():
        raise MlaconvertError(f"'{name}' is not a Wan DiT checkpoint: {_not_wan_message(sd.keys())}")
    wrong = [
        f"{k} is {tensor_spec(sd, k)[1]}, expected {s}"
        for k, s in expected.items()
        if k in sd and s is not None and tensor_spec(sd, k)[1] != s
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing {_sample(missing)}")
    if unexpected:
        problems.append(f"unexpected {_sample(unexpected)}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:2])}" + (f" ({len(wrong)} tensors)" if len(wrong) > 2 else ""))
    c = config
    raise MlaconvertError(
        f"'{name}' does not match its config (dim {c.dim}, ffn {c.ffn_dim}, {c.num_layers} layers, "
        f"in/out {c.in_dim}/{c.out_dim}, text {c.text_dim}): {'; '.join(problems)}"
    )


# --- file readers ---------------------------------------------------------------------------------------


def _sniff(path: Path) -> str | None:
    """'safetensors', 'torch-zip' or 'torch-pickle' from the first bytes of the file; None for anything else."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise MlaconvertError(f"could not read '{path}': {e.strerror or e}") from e
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container (the default since torch 1.6)
        return "torch-zip"
    if head[:1] == b"\x80":  # torch.save's legacy pickle stream
        return "torch-pickle"
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    return None


def _read_safetensors(paths: Mapping[str, Path] | Path) -> dict[str, torch.Tensor]:
    """Tensors from one file, or from shards given as {key: shard} like an index's weight_map."""
    if isinstance(paths, Path):
        by_file = {paths: None}
    else:
        by_file: dict[Path, list[str] | None] = {}
        for key, shard in paths.items():
            by_file.setdefault(shard, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys() if keys is None else keys:
                    out[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise MlaconvertError(f"could not read '{path}': file is truncated or not a safetensors file ({e})") from e
        except OSError as e:
            raise MlaconvertError(f"could not read '{path}': {e.strerror or e}") from e
    return out


def _read_torch(path: Path, mmap: bool) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler reports a class it will not construct as "Unsupported global: GLOBAL x.y";
        # any other complaint (unknown opcode, ...) means the bytes are not a sound pickle at all.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:
            raise MlaconvertError(f"could not read '{path}': file is truncated or not a PyTorch checkpoint") from e
        raise MlaconvertError(
            f"'{path}' holds Python objects beyond tensors (it contains {refused[1]}); weights_only loading refused "
            "it, and mlaconvert never unpickles arbitrary objects: re-save just the state dict"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise MlaconvertError(f"could not read '{path}': file is truncated or not a PyTorch checkpoint") from e
    if not isinstance(obj, dict):
        raise MlaconvertError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    return obj


def _pick_state_dict(obj: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The generator's tensors out of a training checkpoint, and the key they came from."""
    for key in TRAINING_STATE_KEYS:
        if isinstance(obj.get(key), dict):
            obj, picked = obj[key], key
            break
    else:
        picked = None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MlaconvertError(
            f"'{path}' holds no state dict: expected tensors, or a dict under one of {', '.join(TRAINING_STATE_KEYS)}; "
            f"found {_sample(map(str, obj.keys()))}"
        )
    return tensors, picked


def _weights_in_folder(folder: Path) -> tuple[Path, dict[str, Path] | Path]:
    """(folder holding the weights, {key: shard} or the single file) for a native, mlaconvert or diffusers folder."""
    for candidate in (folder, folder / "transformer"):
        for stem in ("diffusion_pytorch_model", "model"):
            index = candidate / f"{stem}.safetensors.index.json"
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise MlaconvertError(f"'{index}' has no weight_map")
                shards = {key: candidate / shard for key, shard in weight_map.items()}
                absent = sorted({p.name for p in shards.values() if not p.is_file()})
                if absent:
                    raise MlaconvertError(f"'{index}' lists shards that are missing: {_sample(absent)}")
                return candidate, shards
            single = candidate / f"{stem}.safetensors"
            if single.is_file():
                return candidate, single
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) if folder.is_dir() else []
    raise MlaconvertError(
        f"no Wan checkpoint in folder '{folder}': expected diffusion_pytorch_model*.safetensors or model*.safetensors "
        f"(with config.json), or a transformer/ subfolder; found {_sample(found, 6) if found else 'nothing'}"
    )


def read_checkpoint(
    path: Path, *, config: WanConfig | str | Path | None = None, head_dim: int = 128, label: str | None = None,
    lazy: bool = False,
) -> Checkpoint:
    """Read any supported checkpoint into canonical native names.

    The config is, in order: the `config` argument, the config.json beside the weights, or one inferred from
    tensor shapes (with `head_dim` to count heads). `label` names the source in error messages (default: the
    file or folder name), so a Hub snapshot is called by its repo id rather than its cache path. `lazy`: the
    state dict of a safetensors checkpoint reads each tensor when it is looked up (a LazyStateDict), so a model
    larger than memory can be converted layer by layer; a .pt file is memory-mapped anyway.
    """
    path = Path(path)
    label = label or path.name
    if not path.exists():
        raise MlaconvertError(f"no such file or folder: '{path}'")
    files: list[Path]
    info: dict[str, Any] = {}
    container = None
    if path.is_dir():
        weights_dir, weights = _weights_in_folder(path)
        raw = LazyStateDict.of_files(weights) if lazy else _read_safetensors(weights)
        files = sorted(set(weights.values())) if isinstance(weights, dict) else [weights]
        config_json = weights_dir / "config.json"
    else:
        container = _sniff(path)
        if container == "safetensors":
            raw = LazyStateDict.of_files(path) if lazy else _read_safetensors(path)
        elif container in ("torch-zip", "torch-pickle"):
            # mmap keeps a multi-GB checkpoint on disk until a tensor is used; only the zip container supports it.
            raw, info["state_key"] = _pick_state_dict(_read_torch(path, mmap=container == "torch-zip"), path)
            raw = {strip_wrappers(k): v for k, v in raw.items()}
        else:
            raise MlaconvertError(f"could not read '{path}': file is truncated or not a safetensors or PyTorch checkpoint")
        files = [path]
        config_json = path.parent / "config.json"

    naming = detect_naming(raw)
    if naming is None:
        raise MlaconvertError(f"'{label}' is not a Wan DiT checkpoint: {_not_wan_message(raw.keys())}")
    if naming == "diffusers":
        sd = raw.renamed(diffusers_to_native_keys(raw)) if isinstance(raw, LazyStateDict) else diffusers_to_native(raw)
    else:
        sd = raw

    if config is not None:
        cfg = resolve_config(config)
    elif config_json.is_file() and _is_transformer_config(parsed := _read_json(config_json)):
        cfg = config_from_dict(parsed, str(config_json))
        info["config_file"] = str(config_json)
    else:
        cfg = infer_config(sd, head_dim)
        info["config_inferred"] = True
    validate_state_dict(sd, cfg, label)

    if cfg.is_mla:
        fmt = "mlaconvert"
    elif container is not None and container.startswith("torch"):
        fmt = "training"
    else:
        fmt = "diffusers" if naming == "diffusers" else "wan"
    info["naming"] = naming
    info["dtypes"] = sorted({str(tensor_spec(sd, k)[0]).removeprefix("torch.") for k in sd})
    return Checkpoint(config=cfg, state_dict=sd, format=fmt, files=files, info=info)


def _is_transformer_config(d: Mapping[str, Any]) -> bool:
    # A config.json beside a lone weights file may belong to something else entirely (a text encoder, say);
    # only a Wan transformer config is allowed to describe the weights.
    return "dim" in d or d.get("_class_name") in ("WanModel", "WanMLAModel", "WanTransformer3DModel")


def save_native(
    config: WanConfig,
    state_dict: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` in native Wan layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "diffusion_pytorch_model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
    write_json(folder / "config.json", {**config.to_dict(), **(extra_config or {})})
    return folder
