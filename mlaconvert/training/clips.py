"""Clip data for `finetune`: clean latent clips and their prompt embeddings, from one of three places.

- a `--data` folder of safetensors files (`latents` (n, C, F, h, w), `prompt_embeds` (n, L, D));
- for a model of the built-in world, fresh clips of that world — its truth, captioned;
- else the teacher's own rollouts with the streaming sampler, from encoded prompts or seeded random text
  embeddings, cached on disk once under a key of everything that determines them and reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.sampling import check_video_size, rollout
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.model import WanModel
from mlaconvert.outputs import atomic_file
from mlaconvert.training.training_run import derived_seed

if TYPE_CHECKING:
    from mlaconvert.training.finetune import FinetuneSettings

LATENTS_KEY, TEXT_KEY = "latents", "prompt_embeds"
CLIPS_FILE = "clips.safetensors"


@dataclass
class Clips:
    """Clean latent clips and their prompt embeddings, on the CPU in float32."""

    latents: torch.Tensor  # (N, C, F, h, w)
    text: torch.Tensor  # (N, L, text_dim)
    origin: dict[str, Any]  # where they came from: recorded in the report and the run's fingerprint


def _check_clips(latents: torch.Tensor, text: torch.Tensor, config: WanConfig, chunk: int, where: str) -> None:
    pt, ph, pw = config.patch_size
    if latents.ndim != 5 or latents.shape[1] != config.in_dim:
        raise MlaconvertError(
            f"{where}: clips must be (clips, {config.in_dim} channels, frames, height, width), got {tuple(latents.shape)}"
        )
    _, _, frames, h, w = latents.shape
    if frames < chunk or frames % pt or h % ph or w % pw:
        raise MlaconvertError(
            f"{where}: clip size {frames}x{h}x{w} needs at least --chunk {chunk} frames and a size divisible by the patch {pt}x{ph}x{pw}"
        )
    if text.ndim != 3 or text.shape[0] != latents.shape[0] or text.shape[2] != config.text_dim:
        raise MlaconvertError(
            f"{where}: prompt embeddings must be ({latents.shape[0]} clips, tokens, {config.text_dim}), got {tuple(text.shape)}"
        )


def load_clips(folder: str | Path, config: WanConfig, chunk: int) -> Clips:
    """Every `*.safetensors` in `folder` (sorted by name): `latents` (n, C, F, h, w) and `prompt_embeds` (n, L, D)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise MlaconvertError(f"no clips in '{folder}': expected *.safetensors files with '{LATENTS_KEY}' and '{TEXT_KEY}'")
    latents, text = [], []
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                missing = {LATENTS_KEY, TEXT_KEY} - set(f.keys())
                if missing:
                    raise MlaconvertError(f"'{path}' has no {' or '.join(sorted(missing))} tensor")
                lat, txt = f.get_tensor(LATENTS_KEY).float(), f.get_tensor(TEXT_KEY).float()
        except SafetensorError as e:
            raise MlaconvertError(f"'{path}' is not a readable safetensors file: {e}") from e
        _check_clips(lat, txt, config, chunk, str(path))
        if latents and (lat.shape[1:] != latents[0].shape[1:] or txt.shape[1:] != text[0].shape[1:]):
            raise MlaconvertError(f"'{path}': clip or prompt size differs from '{files[0]}'; all clips must share one size")
        latents.append(lat)
        text.append(txt)
    origin = {"kind": "data", "folder": str(folder), "files": [p.name for p in files], "sha256": _files_sha256(files)}
    return Clips(torch.cat(latents), torch.cat(text), origin)


def _files_sha256(files: list[Path]) -> str:
    from mlaconvert.conversion.convert import weights_sha256

    return weights_sha256(files) or ""


def world_clips(config: WanConfig, count: int, frames: int, seed: int) -> Clips:
    """Clips of the world the model was trained on, captioned: for it, the truth is cheaper and better than rollouts."""
    from mlaconvert.evaluation import world

    assert config.world is not None
    video, captions, _ = world.clips(count, frames, seed, config.world)
    text = world.embed_captions(captions, config.text_len, config.text_dim)
    return Clips(video, text, {"kind": "world", "seed": seed, "world": dataclasses.asdict(config.world)})


def _save_clips(path: Path, clips: Clips) -> None:
    with atomic_file(path) as tmp:
        save_file({LATENTS_KEY: clips.latents.contiguous(), TEXT_KEY: clips.text.contiguous()}, tmp,
                  metadata={"origin": json.dumps(clips.origin)})


def _prompt_text(settings: FinetuneSettings, config: WanConfig, prompts: list[str] | None, encoder: str | None,
                 device: torch.device) -> torch.Tensor:
    """One embedding per clip: the prompts cycled, encoded; or seeded random stand-ins."""
    if not prompts:
        from mlaconvert.inference.text import random_prompt_embeds

        return random_prompt_embeds(settings.clips, config.text_len, config.text_dim, settings.seed)
    from mlaconvert.inference.text import DEFAULT_ENCODER, encode_prompts

    cycled = [prompts[i % len(prompts)] for i in range(settings.clips)]
    embeds = encode_prompts(cycled, encoder or DEFAULT_ENCODER, device=device, text_len=config.text_len)
    if embeds.shape[-1] != config.text_dim:
        raise MlaconvertError(f"the text encoder gives {embeds.shape[-1]}-wide embeddings but the model takes {config.text_dim}")
    return embeds.float().cpu()


def generation_key(settings: FinetuneSettings, teacher_sha: str, prompts: list[str] | None) -> str:
    """Names the cached clips by everything that determines them."""
    s = settings
    what = {
        "teacher": teacher_sha, "prompts": prompts, "clips": s.clips, "size": [s.frames, s.height, s.width],
        "generate_batch": s.generate_batch, "seed": s.seed, "chunk": s.sampler.chunk, "steps": list(s.sampler.timesteps),
        "shift": s.sampler.shift,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def generate_clips(
    teacher: WanModel,
    settings: FinetuneSettings,
    text: torch.Tensor,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The teacher's own rollouts for `text` (one clip per embedding), `generate_batch` at a time."""
    s = settings
    out = []
    for i, start in enumerate(range(0, text.shape[0], s.generate_batch)):
        sampler = s.sampler_for(s.frames, seed=derived_seed(s.seed, "generate", i))
        part = text[start : start + s.generate_batch]
        latent_size = check_video_size(s.height, s.width, teacher.config)
        out.append(rollout(teacher, part, frames=s.frames, latent_size=latent_size, settings=sampler).latents)
        if on_batch is not None:
            on_batch(start + part.shape[0])
    return torch.cat(out)


def training_clips(settings: FinetuneSettings, config: WanConfig, teacher: WanModel, teacher_sha: str, folder: Path, *,
                   data: str | Path | None, prompts: list[str] | None, encoder: str | None, device: torch.device,
                   progress: Any, save: bool = True, agree: Callable[[bool], bool] = bool) -> Clips:
    """The user's clips; for a model of the built-in world, fresh clips of that world; else the teacher's,
    generated unless cached in `folder`, and saved there if `save` (under torchrun every process generates them,
    since a sharded teacher's forwards take them all, and rank 0 saves). `agree` makes the processes' answers to
    "cached?" one (rank 0's), so that all of them generate or none does, whatever their own disks hold."""
    if data is not None:
        clips = load_clips(data, config, settings.sampler.chunk)
    elif config.world is not None:
        clips = world_clips(config, settings.clips, settings.frames, derived_seed(settings.seed, "world", 0))
    else:
        key = generation_key(settings, teacher_sha, prompts)
        path = folder / key / CLIPS_FILE
        if agree(path.is_file()):
            clips = load_clips(path.parent, config, settings.sampler.chunk)
        else:
            task = progress.add_task("generate", total=settings.clips, info="teacher rollouts")
            text = _prompt_text(settings, config, prompts, encoder, device)
            latents = generate_clips(teacher, settings, text, on_batch=lambda n: progress.update(task, completed=n))
            origin = {"kind": "generated", "key": key, "text": "prompts" if prompts else "random", "prompts": prompts}
            clips = Clips(latents, text, origin)
            if save:
                _save_clips(path, clips)  # the origin goes into the file's metadata, for people
        clips.origin = {"kind": "generated", "key": key, "folder": str(path.parent)}
    if clips.latents.shape[0] <= settings.held_out:
        raise MlaconvertError(f"{clips.latents.shape[0]} clips leave none for training after {settings.held_out} held out")
    return clips
