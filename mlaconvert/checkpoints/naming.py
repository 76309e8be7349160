"""Tensor names of a Wan DiT: every parameter and its shape in native Wan names (DESIGN §2), the native <->
diffusers key maps, and the wrapper components that distributed or compiled training adds to a key.

Every other module speaks native names; a checkpoint in diffusers naming is renamed once, on reading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig

# Names that distributed/compiled training wraps around the real modules; none of them is a Wan module name.
WRAPPER_COMPONENTS = frozenset({"model", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module"})

# native -> diffusers renames. An entry matches a whole key or a key prefix ending at a '.' boundary.
_TOP_LEVEL_MAP = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
)
_BLOCK_MAP = (
    ("modulation", "scale_shift_table"),
    *(
        (f"{native}.{src}", f"{diff}.{dst}")
        for native, diff in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for src, dst in (
            ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k")
        )
    ),
    # Native norm1/norm2 carry no parameters; the affine cross-attention norm is norm3 natively, norm2 in diffusers.
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)
_BLOCK_KEY = re.compile(r"(blocks\.\d+)\.(.+)")
# (top-level table, per-block table) for each direction, keyed by `to_diffusers`.
_TABLES = {
    True: (_TOP_LEVEL_MAP, _BLOCK_MAP),
    False: tuple(tuple((dst, src) for src, dst in table) for table in (_TOP_LEVEL_MAP, _BLOCK_MAP)),
}


def native_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the dense model with its shape, in native Wan names and module order."""
    c, d = config, config.dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, c.in_dim, *c.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, c.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, c.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(c.num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{b}{attn}.{proj}.bias"] = (d,)
            if c.qk_norm:
                shapes[f"{b}{attn}.norm_q.weight"] = (d,)
                shapes[f"{b}{attn}.norm_k.weight"] = (d,)
            if attn == "self_attn" and c.cross_attn_norm:
                shapes[b + "norm3.weight"] = (d,)
                shapes[b + "norm3.bias"] = (d,)
        shapes[b + "ffn.0.weight"] = (c.ffn_dim, d)
        shapes[b + "ffn.0.bias"] = (c.ffn_dim,)
        shapes[b + "ffn.2.weight"] = (d, c.ffn_dim)
        shapes[b + "ffn.2.bias"] = (d,)
    shapes["head.modulation"] = (1, 2, d)
    shapes["head.head.weight"] = (c.out_dim * math.prod(c.patch_size), d)
    shapes["head.head.bias"] = (c.out_dim * math.prod(c.patch_size),)
    return shapes


def _rename(key: str, table: Iterable[tuple[str, str]]) -> str | None:
    for src, dst in table:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def _map_key(key: str, to_diffusers: bool) -> str | None:
    """One key in the other naming, or None when the key belongs to neither table."""
    top_level, per_block = _TABLES[to_diffusers]
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        rest = _rename(m[2], per_block)
        return None if rest is None else f"{m[1]}.{rest}"
    return _rename(key, top_level)


def key_map(keys: Iterable[str], to_diffusers: bool) -> dict[str, str]:
    """{key: its name in the other naming}, read from the names alone (no tensor is touched)."""
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    for key in keys:
        # Keys outside the map (MLA projections, an I2V model's image branch) keep their name so that
        # validation can name them instead of silently dropping weights.
        new = _map_key(key, to_diffusers) or key
        if new in taken:
            raise MlaconvertError(f"checkpoint has both '{key}' and a key that also maps to '{new}'")
        out[key] = taken[new] = new
    return out


def native_to_diffusers_keys(keys: Iterable[str]) -> dict[str, str]:
    return key_map(keys, to_diffusers=True)


def diffusers_to_native_keys(keys: Iterable[str]) -> dict[str, str]:
    return key_map(keys, to_diffusers=False)


def native_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native Wan keys to `WanTransformer3DModel` keys (tensors are shared, not copied)."""
    return {new: sd[old] for old, new in native_to_diffusers_keys(sd).items()}


def diffusers_to_native(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `WanTransformer3DModel` keys to native Wan keys (tensors are shared, not copied)."""
    return {new: sd[old] for old, new in diffusers_to_native_keys(sd).items()}


def detect_naming(keys: Iterable[str]) -> str | None:
    """'native' or 'diffusers' by which naming explains more keys; None when neither explains any."""
    native = diffusers = 0
    for key in keys:
        native += _map_key(key, to_diffusers=True) is not None
        diffusers += _map_key(key, to_diffusers=False) is not None
    if native == diffusers == 0:
        return None
    # patch_embedding is spelled the same in both, so a tie means nothing else was recognised: call it native.
    return "native" if native >= diffusers else "diffusers"


def strip_wrappers(key: str) -> str:
    """Drop FSDP / activation-checkpointing / torch.compile / DDP wrapper components from a key."""
    return ".".join(part for part in key.split(".") if part not in WRAPPER_COMPONENTS)
