"""Model configuration: the Wan2.1 DiT hyper-parameters and, for converted models, the MLA block.

`config.json` uses Wan's native field names (`dim`, `ffn_dim`, `num_heads`, ...) so an export reads like the
official checkpoints; fields the official config leaves out (`patch_size`, `qk_norm`, `text_dim`, ...) take
Wan's defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation.world import WorldSettings


@dataclass(frozen=True)
class MLAConfig:
    """How self-attention was turned into latent attention (see DESIGN §3)."""

    dc: tuple[int, ...]  # latent width per layer
    rope_dim: int  # width of the shared, unrotated rope key r
    nope_dim: int  # head_dim - rope_dim: per-head content key width
    q_rank: int | None = None  # low-rank query (W_q_up W_q_down), None = full
    rope_pairs: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()  # per layer, per axis
    init: str = "svd"
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    mlaconvert_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dc"] = list(self.dc)
        d["rope_pairs"] = [[list(axis) for axis in layer] for layer in self.rope_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["dc"] = tuple(int(x) for x in d["dc"])
        d["rope_pairs"] = tuple(tuple(tuple(int(i) for i in axis) for axis in layer) for layer in d.get("rope_pairs", ()))
        return cls(**d)


@dataclass(frozen=True)
class SamplerDefaults:
    """The sampler a model was trained for; `sample`, `eval` and `finetune` use it unless told otherwise.

    Wan's streaming models (Self-Forcing and kin) denoise each 3-frame chunk in 4 steps under shift 5 with a
    21-frame window; a model trained from scratch on pixels may want more steps and no shift.
    """

    steps: int = 4  # denoising steps, evenly spaced from 1000 before the shift (4: 1000, 750, 500, 250)
    shift: float = 5.0
    chunk: int = 3  # latent frames per autoregressive chunk
    window: int = 21  # attention span in latent frames, the current chunk included
    sink: int = 0  # first latent frames the cache keeps for good once the window slides
    positions: str = "auto"  # RoPE frame positions in the cache: absolute, reindex, or auto (see sampling.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplerDefaults:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MlaconvertError(f"unknown sampler setting(s) {', '.join(sorted(unknown))} in config.json; known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1-architecture DiT. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    # Pixels (and video frames) per latent position along (time, height, width): Wan's VAE is (4, 8, 8); a model
    # that works on pixels directly has (1, 1, 1).
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    # What turns prompts into `text`: "umt5" (Wan's encoder, from a diffusers-layout repo) or "captions" (the
    # built-in world's deterministic caption embedder, mlaconvert.evaluation.world).
    text_encoder: str = "umt5"
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    # A model trained on the built-in world (mlaconvert.evaluation.world) records which one, so `eval` can draw fresh clips of it.
    world: WorldSettings | None = None
    mla: MLAConfig | None = None

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise MlaconvertError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise MlaconvertError(f"head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_mla(self) -> bool:
        return self.mla is not None

    def kv_values_per_token(self, layer: int = 0) -> int:
        """Cached values per token and layer: 2*H*head_dim dense, dc + rope_dim latent."""
        if self.mla is None:
            return 2 * self.dim
        return self.mla.dc[layer] + self.mla.rope_dim

    def replace(self, **changes: Any) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": "WanModel", "model_type": "t2v"}
        for f in dataclasses.fields(self):
            if f.name == "mla":
                continue
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif dataclasses.is_dataclass(v):
                v = dataclasses.asdict(v)
            if v is not None:
                d[f.name] = v
        if self.mla is not None:
            d["_class_name"] = "WanMLAModel"
            d["mla"] = self.mla.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        """Read a native Wan `config.json` (or an mlaconvert export's); unknown fields are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - {"mla"}
        kwargs = {k: v for k, v in d.items() if k in known}
        for name in ("patch_size", "vae_stride"):
            if name in kwargs:
                kwargs[name] = tuple(int(p) for p in kwargs[name])
        if "sampler" in kwargs:
            kwargs["sampler"] = SamplerDefaults.from_dict(dict(kwargs["sampler"]))
        if kwargs.get("world") is not None:
            kwargs["world"] = WorldSettings(**kwargs["world"])
        if "qk_norm" in kwargs:
            kwargs["qk_norm"] = bool(kwargs["qk_norm"])
        mla = MLAConfig.from_dict(d["mla"]) if d.get("mla") else None
        return cls(**kwargs, mla=mla)


def rope_axis_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a rotary width over (frame, row, column): row = column = 2*(d//6), frame gets the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


PRESETS: dict[str, WanConfig] = {
    "wan2.1-1.3b": WanConfig(),
    "wan2.1-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def preset(name: str) -> WanConfig:
    key = name.lower()
    if key not in PRESETS:
        raise MlaconvertError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]
