"""Streaming VAE decode against diffusers' own one-shot decode, on tiny Wan 2.1- and Wan 2.2-style VAEs; the
mp4 writer read back through ffmpeg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.video import Mp4Writer, StreamingDecoder, load_vae

diffusers = pytest.importorskip("diffusers")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

Z_DIM = 8

# Wan 2.1's VAE in small: 3 temporal and spatial x2 stages, causal convolutions, a mid-block attention.
WAN21 = dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
# Wan 2.2's: residual up-blocks whose first-frame handling depends on `first_chunk`, and 2x2 patches.
WAN22 = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
)


def make_vae(kind: dict) -> diffusers.AutoencoderKLWan:
    g = torch.Generator().manual_seed(0)
    stats = dict(
        latents_mean=torch.randn(Z_DIM, generator=g).tolist(), latents_std=(1 + torch.rand(Z_DIM, generator=g)).tolist()
    )
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(**kind, **stats).eval()


def denormalised(vae, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return z * std + mean


@pytest.fixture(scope="module")
def wan21() -> diffusers.AutoencoderKLWan:
    return make_vae(WAN21)


@pytest.mark.parametrize("kind", [WAN21, WAN22], ids=["wan2.1", "wan2.2"])
def test_streamed_decode_equals_one_shot_decode(kind: dict):
    vae = make_vae(kind)
    z = torch.randn(2, Z_DIM, 7, 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = vae.decode(denormalised(vae, z)).sample
        undone = vae.decode(z).sample
    scale = vae.config.scale_factor_spatial
    assert reference.shape == (2, 3, 1 + 4 * 6, 2 * scale, 3 * scale)
    assert (reference - undone).abs().max() > 0.1  # the de-normalisation matters

    decoder = StreamingDecoder(vae)
    chunks = [decoder.decode(c) for c in z.split(3, dim=2)]  # latent frames 3, 3, 1
    assert [c.shape[2] for c in chunks] == [9, 12, 4]  # 1 + 4 + 4, then 4 per latent frame
    streamed = torch.cat(chunks, dim=2)
    assert (streamed - reference).abs().max() < 1e-5

    decoder.reset()  # a new video, in uneven chunks, on the same decoder
    streamed = torch.cat([decoder.decode(c) for c in z.split([1, 2, 4], dim=2)], dim=2)
    assert (streamed - reference).abs().max() < 1e-5


def test_decoder_state_stays_bounded(wan21):
    """The decoder keeps at most two time steps per causal convolution, however long the video."""
    decoder = StreamingDecoder(wan21)
    for _ in range(4):
        decoder.decode(torch.randn(1, Z_DIM, 3, 2, 3))
        assert max(t.shape[2] for t in decoder._feat_cache if isinstance(t, torch.Tensor)) <= 2


@pytest.mark.gpu
@needs_cuda
def test_streamed_decode_on_gpu(monkeypatch: pytest.MonkeyPatch):
    # TF32 convolutions would round differently for the whole video and for a chunk of it.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    vae = make_vae(WAN21).cuda()
    z = torch.randn(1, Z_DIM, 7, 8, 8)
    with torch.no_grad():
        reference = vae.decode(denormalised(vae, z).cuda()).sample
    decoder = StreamingDecoder(vae)
    streamed = torch.cat([decoder.decode(c) for c in z.split(3, dim=2)], dim=2)  # CPU latents, moved per chunk
    assert streamed.device.type == "cuda" and streamed.shape == reference.shape
    assert (streamed - reference).abs().max() < 1e-4  # cuDNN may pick other kernels for other shapes


def test_decode_moves_and_checks_latents(wan21):
    decoder = StreamingDecoder(wan21)
    z = torch.randn(1, Z_DIM, 2, 4, 6, dtype=torch.float64)
    assert decoder.decode(z).dtype == torch.float32
    expected = rf"latents must be \(batch, {Z_DIM}, frames >= 1, height, width\), got shape \(1, 16, 2, 4, 6\)"
    with pytest.raises(MlaconvertError, match=expected):
        decoder.decode(torch.randn(1, 16, 2, 4, 6))


def test_load_vae(wan21, tmp_path: Path, hub_cache):
    wan21.save_pretrained(tmp_path / "repo" / "vae")
    (tmp_path / "repo" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (tmp_path / "repo" / "transformer").mkdir()
    for spec in (tmp_path / "repo", tmp_path / "repo" / "vae"):
        vae = load_vae(str(spec), device="cpu")
        assert vae.config.z_dim == Z_DIM and next(vae.parameters()).dtype == torch.float32
    hub_cache.add("org/wan-diffusers", tmp_path / "repo")
    vae = load_vae("org/wan-diffusers", device="cpu", dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    assert torch.equal(vae.decoder.conv_in.weight, wan21.decoder.conv_in.weight.bfloat16())

    with pytest.raises(MlaconvertError, match="no Wan VAE in .*vae/config.json"):
        load_vae(str(tmp_path / "repo" / "transformer"), device="cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(MlaconvertError, match="holds a AutoencoderKL, not a Wan VAE \\(AutoencoderKLWan\\)"):
        load_vae(str(tmp_path / "other"), device="cpu")
    with pytest.raises(MlaconvertError, match="org/absent.*not in the local Hugging Face cache"):
        load_vae("org/absent", device="cpu")
    (tmp_path / "repo" / "transformer" / "config.json").write_text("{}")
    hub_cache.add("org/transformer-only", tmp_path / "repo" / "transformer")
    with pytest.raises(MlaconvertError, match="'org/transformer-only' has no vae/ in the local Hugging Face cache"):
        load_vae("org/transformer-only", device="cpu")


def read_mp4(path: Path) -> tuple[dict, np.ndarray]:
    reader = pytest.importorskip("imageio_ffmpeg").read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = np.stack([np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader])
    return meta, frames


def test_mp4_round_trip(wan21, tmp_path: Path):
    pytest.importorskip("imageio_ffmpeg")
    decoder = StreamingDecoder(wan21)
    path = tmp_path / "out" / "video.mp4"
    with Mp4Writer(path, fps=16) as video:
        for chunk in torch.randn(1, Z_DIM, 7, 4, 6).split(3, dim=2):
            video.write(decoder.decode(chunk)[0])
    assert video.frames_written == 25
    meta, frames = read_mp4(path)
    assert frames.shape == (25, 32, 48, 3) and meta["fps"] == 16
    assert [p.name for p in path.parent.iterdir()] == ["video.mp4"]  # no temporary file left

    # Smooth content survives H.264 (lossy, chroma subsampled) to within a few levels.
    axes = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 48)
    t, y, x = torch.meshgrid(*axes, indexing="ij")
    ramp = torch.stack([x, y, 0.5 * t])
    with Mp4Writer(path, fps=8, force=True) as video:
        video.write(ramp)
    _, frames = read_mp4(path)
    expected = ((ramp.permute(1, 2, 3, 0) + 1) * 127.5).round().numpy()
    assert frames.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(float) - expected).mean() < 3


def test_mp4_refuses_to_overwrite_and_cleans_up(tmp_path: Path):
    pytest.importorskip("imageio_ffmpeg")
    path = tmp_path / "video.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(MlaconvertError, match="already exists; pass --force"):
        with Mp4Writer(path) as video:
            video.write(torch.zeros(3, 1, 16, 16))
    assert path.read_bytes() == b"precious"

    with pytest.raises(RuntimeError, match="rollout failed"):
        with Mp4Writer(path, force=True) as video:
            video.write(torch.zeros(3, 2, 16, 16))
            raise RuntimeError("rollout failed")
    with pytest.raises(MlaconvertError, match="frames of 8x8 in a video of 16x16"):
        with Mp4Writer(path, force=True) as video:
            video.write(torch.zeros(3, 2, 16, 16))
            video.write(torch.zeros(3, 2, 8, 8))
    with pytest.raises(MlaconvertError, match="no frames were written"):
        with Mp4Writer(path, force=True):
            pass
    assert path.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["video.mp4"]
