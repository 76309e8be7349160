"""Prompts -> the umT5 text embeddings a Wan DiT cross-attends to, or a saved / random stand-in for them.

The encoder is the `text_encoder/` (transformers `UMT5EncoderModel`) and `tokenizer/` of a diffusers-layout Wan
repo. Its output follows Wan's pipelines exactly: each prompt is cleaned, tokenized to `text_len` tokens, encoded
with its attention mask, and every position past the prompt's own tokens is set to zero (Wan trims each
sequence to its length and pads it back with zeros).

Wan's encoder is umT5-XXL: 5.7 B parameters, 11 GB in bf16. It runs once per call and is freed before returning,
so that the sampler that follows has the GPU to itself.
"""

from __future__ import annotations

import gc
import html
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlaconvert.checkpoints.hub import fetch_component
from mlaconvert.devices import choose_device, default_dtype
from mlaconvert.errors import MlaconvertError
from mlaconvert.outputs import atomic_file, check_writable

DEFAULT_ENCODER = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
EMBEDS_KEY = "prompt_embeds"

# Relative to text_encoder/ and tokenizer/. Only safetensors weights: a repo that also ships .bin files would
# otherwise be downloaded twice over (11 GB each).
ENCODER_PATTERNS = ["config.json", "model*.safetensors*"]
TOKENIZER_PATTERNS = ["*"]

# Used by random_prompt_embeds. umT5's last layer is an RMS norm with a learned gain, so its outputs have a
# roughly constant per-token scale; Wan's context vectors are of order 0.1 per value. 0.15 gives the text
# cross-attention inputs of that size, so that a run without an encoder exercises realistic magnitudes (the
# exact value only matters for numerics, never for speed or memory).
RANDOM_TEXT_STD = 0.15

_NO_ENCODER_HINT = "pass --prompt-embeds FILE.safetensors or --random-text instead"


def encode_prompts(
    prompts: list[str],
    encoder: str = DEFAULT_ENCODER,
    *,
    device: str | torch.device | None = None,
    text_len: int = 512,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, text_len, d_model) umT5 embeddings of `prompts` on `device` (default: CUDA when there is one), in
    `dtype` (default: bf16 on CUDA, float32 on CPU), zero past each prompt's tokens.

    `encoder` is a diffusers-layout Hub repo (`org/name[@revision]`) or local folder with `text_encoder/` and
    `tokenizer/`; from the Hub only those two folders are fetched."""
    if not prompts:
        raise MlaconvertError("no prompts to encode")
    if text_len < 1:
        raise MlaconvertError(f"text length must be at least 1, got {text_len}")
    device = choose_device(device)
    dtype = dtype or default_dtype(device)

    tokenizer, model = _load_encoder(encoder, dtype)
    tokens = tokenizer(
        [_clean_prompt(p) for p in prompts],
        max_length=text_len,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    try:
        model.to(device)
        with torch.no_grad():
            hidden = model(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        embeds = hidden.last_hidden_state.to(dtype)
    finally:
        # Dropping the only reference frees the encoder's GPU memory (moving it to the CPU first would just copy
        # 11 GB); gc breaks any reference cycles inside the module tree, and empty_cache hands the freed blocks
        # back to the driver so that the sampler, or another process, can use them.
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lengths = tokens.attention_mask.sum(dim=1).to(device)
    keep = torch.arange(text_len, device=device)[None, :] < lengths[:, None]
    return embeds * keep[:, :, None].to(dtype)


def save_prompt_embeds(
    path: str | Path, embeds: torch.Tensor, prompts: list[str] | None = None, *, force: bool = False
) -> None:
    """Write (B, L, D) embeddings as a safetensors file (key `prompt_embeds`, prompts as JSON in the metadata)."""
    path = Path(path)
    check_writable(path, force)
    if embeds.ndim != 3:
        raise MlaconvertError(f"prompt embeddings must be (batch, tokens, dim), got shape {tuple(embeds.shape)}")
    if prompts is not None and len(prompts) != embeds.shape[0]:
        raise MlaconvertError(f"{len(prompts)} prompts for {embeds.shape[0]} prompt embeddings")
    metadata = {"format": "pt"} | ({"prompts": json.dumps(prompts)} if prompts is not None else {})
    with atomic_file(path) as tmp:
        save_file({EMBEDS_KEY: embeds.detach().cpu().contiguous()}, tmp, metadata=metadata)


def load_prompt_embeds(path: str | Path) -> tuple[torch.Tensor, list[str] | None]:
    """(embeddings (B, L, D) on the CPU in their stored dtype, the prompts when the file records them)."""
    path = Path(path)
    if not path.is_file():
        raise MlaconvertError(f"no such prompt embeddings file: '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            if EMBEDS_KEY not in keys:
                raise MlaconvertError(f"'{path}' has no '{EMBEDS_KEY}' tensor (it has: {', '.join(keys) or 'none'})")
            embeds = f.get_tensor(EMBEDS_KEY)
    except SafetensorError as e:
        raise MlaconvertError(f"'{path}' is not a readable safetensors file: {e}") from e
    if embeds.ndim != 3:
        raise MlaconvertError(
            f"'{path}': '{EMBEDS_KEY}' must be (batch, tokens, dim), got shape {tuple(embeds.shape)}"
        )
    if "prompts" not in metadata:
        return embeds, None
    try:
        prompts = json.loads(metadata["prompts"])
    except json.JSONDecodeError as e:
        raise MlaconvertError(f"'{path}': the 'prompts' metadata is not JSON ({e})") from e
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and len(prompts) == len(embeds)):
        raise MlaconvertError(f"'{path}': the 'prompts' metadata is not a list of {len(embeds)} strings")
    return embeds, prompts


def random_prompt_embeds(batch: int, text_len: int, text_dim: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian stand-ins for umT5 embeddings: (batch, text_len, text_dim), float32, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, text_len, text_dim, generator=generator) * RANDOM_TEXT_STD


def _load_encoder(spec: str, dtype: torch.dtype):
    """(tokenizer, UMT5EncoderModel on the CPU in `dtype`) from a diffusers-layout repo or folder."""
    try:
        from transformers import AutoTokenizer, UMT5EncoderModel
    except ImportError as e:
        raise MlaconvertError("encoding prompts needs transformers: install mlaconvert[video]") from e
    try:
        encoder_dir = fetch_component(spec, "text_encoder", ENCODER_PATTERNS)
        tokenizer_dir = fetch_component(spec, "tokenizer", TOKENIZER_PATTERNS)
    except MlaconvertError as e:
        raise MlaconvertError(f"{e}; or {_NO_ENCODER_HINT}") from e
    has_weights = any(encoder_dir.glob("model*.safetensors"))
    if not (encoder_dir / "config.json").is_file() or not has_weights:
        raise MlaconvertError(
            f"no umT5 text encoder (text_encoder/ with safetensors weights) in '{spec}': {_NO_ENCODER_HINT}"
        )
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise MlaconvertError(f"no tokenizer (tokenizer/) in '{spec}': {_NO_ENCODER_HINT}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = UMT5EncoderModel.from_pretrained(encoder_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise MlaconvertError(f"cannot load the text encoder from '{spec}': {str(e).splitlines()[0]}") from e
    return tokenizer, model.eval()


def _clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: repair broken unicode (ftfy, when installed: the video extra brings it), undo
    (double) HTML escaping, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()
