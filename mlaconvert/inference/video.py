"""Wan latents -> pixels, decoded chunk by chunk as a rollout produces them, and pixels -> an mp4 file.

Wan's VAE decoder is causal in time: diffusers' `AutoencoderKLWan._decode` feeds it one latent frame at a time
and carries, for every causal convolution, the last two time steps of that convolution's input (`feat_cache`)
from one frame to the next. `StreamingDecoder` runs the same per-frame loop but keeps that cache between
calls, so decoding a video chunk after chunk gives exactly the frames of one decode of the whole video, while
holding only the cache (two frames of activations per convolution) and the current chunk.

The first latent frame of a video decodes to 1 frame and every later one to 4 (Wan's 4x temporal compression
with a causal first frame): T latent frames are 1 + 4 (T - 1) video frames.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from mlaconvert.checkpoints.hub import fetch_component
from mlaconvert.devices import choose_device
from mlaconvert.errors import MlaconvertError
from mlaconvert.outputs import atomic_file, check_writable

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

# Relative to vae/: its config and its diffusers weights, nothing else from the repo.
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model*"]


def _vae_class() -> type[AutoencoderKLWan]:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise MlaconvertError("decoding video needs diffusers: install mlaconvert[video]") from e
    return AutoencoderKLWan


def load_vae(
    spec: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKLWan:
    """Wan's VAE from a diffusers-layout Hub repo (`org/name[@revision]`, only `vae/` is fetched) or a local
    folder (a pipeline root with `vae/`, or the VAE folder itself), on `device` (default: CUDA when there is
    one) in `dtype` (default float32, as Wan's pipelines run it)."""
    AutoencoderKLWan = _vae_class()
    folder = fetch_component(spec, "vae", VAE_PATTERNS)
    config = folder / "config.json"
    if not config.is_file():
        raise MlaconvertError(f"no Wan VAE in '{spec}': expected vae/config.json of a diffusers-layout repo")
    class_name = json.loads(config.read_text()).get("_class_name")
    if class_name != "AutoencoderKLWan":
        what = class_name or "model of unknown class"
        raise MlaconvertError(f"'{folder}' holds a {what}, not a Wan VAE (AutoencoderKLWan)")
    try:
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise MlaconvertError(f"cannot load the Wan VAE from '{folder}': {str(e).splitlines()[0]}") from e
    return vae.to(choose_device(device)).eval()


def random_vae(z_dim: int = 16, *, small: bool = False, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> AutoencoderKLWan:
    """Wan 2.1's VAE (diffusers' defaults) with seeded random weights: what decoding costs, without a download.
    `small` shrinks its widths for CPU tests; a z_dim other than 16 gets neutral latent statistics."""
    AutoencoderKLWan = _vae_class()
    shape = {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1} if small else {}
    stats = {} if z_dim == 16 else {"latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}
    torch.manual_seed(seed)
    return AutoencoderKLWan(z_dim=z_dim, **shape, **stats).to(choose_device(device), dtype).eval()


class StreamingDecoder:
    """Decodes one video's normalised latents chunk by chunk; `reset()` before the next video.

        decoder = StreamingDecoder(vae)
        for chunk in rollout:                 # (B, z_dim, f, h, w), normalised as Wan's samplers produce them
            pixels = decoder.decode(chunk)    # (B, 3, 1 + 4 (f - 1) for the first chunk else 4 f, s h, s w)

    (s is the VAE's spatial factor: 8 for Wan 2.1's, 16 for Wan 2.2's.)

    The VAE's own tiling and slicing settings are not used: those decode the whole video at once.
    """

    def __init__(self, vae: AutoencoderKLWan):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        param = next(vae.parameters())
        # Wan's samplers work on latents normalised per channel; the VAE decodes z * std + mean.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self._mean = torch.tensor(vae.config.latents_mean, dtype=param.dtype, device=param.device).view(shape)
        self._std = torch.tensor(vae.config.latents_std, dtype=param.dtype, device=param.device).view(shape)
        self.reset()

    def to(self, device: torch.device) -> StreamingDecoder:
        """Move the VAE to `device` (a new video starts there)."""
        self.vae.to(device)
        self._mean, self._std = self._mean.to(device), self._std.to(device)
        self.reset()
        return self

    def reset(self) -> None:
        """Forget the previous video: the next chunk is decoded as the start of a new one."""
        self._feat_cache: list[torch.Tensor | str | None] = [None] * self._num_convs
        self._first_frame = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, channels, frames, H, W), on the VAE's device, for the next latent frames."""
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim or latents.shape[2] == 0:
            raise MlaconvertError(
                f"latents must be (batch, {self.vae.config.z_dim}, frames >= 1, height, width), "
                f"got shape {tuple(latents.shape)}"
            )
        z = latents.to(device=self._mean.device, dtype=self._mean.dtype) * self._std + self._mean
        x = self.vae.post_quant_conv(z)  # a 1x1x1 convolution: frame by frame, no state
        frames = []
        for i in range(x.shape[2]):
            # feat_idx is the decoder's cursor into feat_cache; each frame walks the convolutions from the start.
            # first_chunk marks the video's first frame, which Wan 2.2's residual upsamplers decode to 1 frame.
            frames.append(
                self.vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=self._first_frame
                )
            )
            self._first_frame = False
        out = torch.cat(frames, dim=2)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1.0, 1.0)


class Mp4Writer:
    """Streams RGB frames into an H.264 mp4 through ffmpeg (imageio-ffmpeg), written atomically:

        with Mp4Writer("out.mp4", fps=16) as video:
            for chunk in ...:
                video.write(pixels[0])        # (3, T, H, W) in [-1, 1]

    Frames go to a temporary file next to `path`, renamed into place when the block ends without an error. An
    existing `path` is refused unless `force`. All frames must have the size of the first ones.
    """

    def __init__(self, path: str | Path, fps: float = 16, *, force: bool = False, quality: float = 5):
        try:
            import imageio_ffmpeg
        except ImportError as e:
            raise MlaconvertError("writing mp4 needs imageio-ffmpeg: install mlaconvert[video]") from e
        self._write_frames = imageio_ffmpeg.write_frames
        self.path = Path(path)
        self.fps = fps
        self.force = force
        self.quality = quality  # imageio-ffmpeg's 1..10 scale; 5 (libx264 crf 25) is diffusers' export_to_video default
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._ffmpeg = None

    def __enter__(self) -> Mp4Writer:
        self._session = self._open()
        return self._session.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return self._session.__exit__(exc_type, exc, tb)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Mp4Writer]:
        check_writable(self.path, self.force)
        with atomic_file(self.path) as self._tmp:
            try:
                yield self
            finally:
                if self._ffmpeg is not None:
                    self._ffmpeg.close()  # flushes and waits for ffmpeg to finish the file
            if self.frames_written == 0:
                raise MlaconvertError(f"no frames were written to '{self.path}'")

    def write(self, frames: torch.Tensor) -> None:
        """Append (3, T, H, W) frames in [-1, 1] (values outside are clipped)."""
        if frames.ndim != 4 or frames.shape[0] != 3:
            raise MlaconvertError(f"frames must be (3, frames, height, width), got shape {tuple(frames.shape)}")
        height, width = frames.shape[2:]
        if self._ffmpeg is None:
            self._size = (height, width)
            # The temporary file's name ends in .tmp, so the container is named explicitly. yuv420p (what players
            # expect) needs even sizes: macro_block_size=2 lets ffmpeg stretch an odd size by one pixel, no more.
            self._ffmpeg = self._write_frames(
                str(self._tmp),
                (width, height),
                fps=self.fps,
                quality=self.quality,
                macro_block_size=2,
                output_params=["-f", "mp4"],
            )
            self._ffmpeg.send(None)
        elif (height, width) != self._size:
            raise MlaconvertError(f"frames of {height}x{width} in a video of {self._size[0]}x{self._size[1]}")
        pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for frame in pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy():  # (H, W, 3) each
            self._ffmpeg.send(frame)
        self.frames_written += frames.shape[1]
