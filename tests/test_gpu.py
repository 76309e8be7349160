"""The same model, caches, conversion and sampler on a CUDA device; skipped where there is none."""

from __future__ import annotations

import json

import pytest
import torch

from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_model
from mlaconvert.inference.sampling import SamplerSettings, rollout
from mlaconvert.modeling.cache import KVCache
from mlaconvert.modeling.model import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny():
    return load_source("builtin:tiny-wan")


@pytest.fixture(scope="module")
def tiny_mla(tiny):
    return convert_model(tiny, ConvertSettings(dc=48, rope_dim=16, measure=False))


def inputs(frames=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, frames, 4, 6, generator=g), torch.randn(2, 32, 64, generator=g)


def test_bf16_on_gpu_tracks_fp32_on_cpu(tiny):
    x, text = inputs()
    t = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        ref = load_model(tiny.config, tiny.state_dict).eval()(x, t, text)
        gpu = load_model(tiny.config, tiny.state_dict, device="cuda", dtype=torch.bfloat16).eval()
        got = gpu(x.cuda(), t.cuda(), text.cuda()).cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_cached_chunks_equal_block_causal_forward_on_gpu(tiny, tiny_mla, kind):
    ckpt = tiny if kind == "dense" else tiny_mla
    model = load_model(ckpt.config, ckpt.state_dict, device="cuda").eval()
    x, text = (v.cuda() for v in inputs())
    t = torch.full((2, 6), 300.0, device="cuda")
    with torch.no_grad():
        expected = model(x, t, text, chunk_frames=2)
        cache = KVCache(model, batch=2, frame_shape=(2, 3), window=6)
        got = torch.cat([model(x[:, :, s : s + 2], t[:, :2], text, cache=cache.step(2, commit=True)) for s in (0, 2, 4)], dim=2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gpu_rollout_is_reproducible_and_matches_cpu(tiny_mla):
    text = torch.randn(1, 32, 64)
    settings = SamplerSettings(chunk=3, window=6, seed=5)
    cpu_model = load_model(tiny_mla.config, tiny_mla.state_dict).eval()
    gpu_model = load_model(tiny_mla.config, tiny_mla.state_dict, device="cuda").eval()
    a = rollout(gpu_model, text, frames=9, latent_size=(4, 4), settings=settings)
    b = rollout(gpu_model, text, frames=9, latent_size=(4, 4), settings=settings)
    c = rollout(cpu_model, text, frames=9, latent_size=(4, 4), settings=settings)
    assert torch.equal(a.latents, b.latents)
    torch.testing.assert_close(a.latents, c.latents, atol=1e-3, rtol=1e-3)
    assert a.peak_memory and a.peak_memory > 0


@pytest.mark.parametrize("kind", ["dense", "mla"])
@pytest.mark.parametrize("positions", ["absolute", "reindex"])
def test_cuda_graphs_replay_the_eager_rollout(tiny, tiny_mla, kind, positions, monkeypatch):
    """The steady state replayed as CUDA graphs gives the eager rollout's frames, in bf16 as served. Once the window
    (6 frames, a sink of 1) is full, one capture serves every denoising step and commit pass of the 2-frame chunks,
    and a second one the last, 1-frame chunk, from the same memory pool."""
    from mlaconvert.inference.graphs import ChunkForward, _Captured

    ckpt = tiny if kind == "dense" else tiny_mla
    model = load_model(ckpt.config, ckpt.state_dict, device="cuda", dtype=torch.bfloat16).eval()
    captures, replays = [], []
    capture, replay = ChunkForward._capture, _Captured.replay
    monkeypatch.setattr(ChunkForward, "_capture", lambda self, *a: captures.append(1) or capture(self, *a))
    monkeypatch.setattr(_Captured, "replay", lambda self, *a: replays.append(1) or replay(self, *a))
    text = torch.randn(2, 32, 64)
    eager = SamplerSettings(chunk=2, window=6, sink=1, seed=3, positions=positions)
    graphed = SamplerSettings(chunk=2, window=6, sink=1, seed=3, positions=positions, graphs=True)
    a = rollout(model, text, frames=13, latent_size=(4, 6), settings=eager)
    b = rollout(model, text, frames=13, latent_size=(4, 6), settings=graphed)
    # Chunks 3-6 (2 frames) and 7 (1 frame) run against the full window: each its denoising steps and commit pass.
    assert len(captures) == 2 and len(replays) == 5 * (len(eager.timesteps) + 1)
    torch.testing.assert_close(b.latents, a.latents, atol=2e-2, rtol=2e-2)


def test_graphed_rollouts_leave_no_memory_behind(tiny_mla):
    """Rollout after rollout with CUDA graphs, the GPU holds what it held after the first: the captures' cuBLAS
    workspaces (one per stream, kept for the process's life) do not pile up."""
    import gc

    model = load_model(tiny_mla.config, tiny_mla.state_dict, device="cuda", dtype=torch.bfloat16).eval()
    settings = SamplerSettings(chunk=2, window=6, seed=3, graphs=True)
    held = []
    for _ in range(3):
        rollout(model, torch.randn(1, 32, 64), frames=11, latent_size=(4, 6), settings=settings)
        gc.collect()
        held.append(torch.cuda.memory_allocated())
    assert held[1] == held[0] and held[2] == held[0]


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_compiled_blocks_in_cuda_graphs_give_the_eager_rollout(tiny, tiny_mla, kind, monkeypatch):
    """The fastest path (compiled blocks, steady state as CUDA graphs) gives the eager rollout's frames at batch 1
    and 2, with every block compiled: a fallback to eager code at the recompile limit fails the test."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    ckpt = tiny if kind == "dense" else tiny_mla
    model = load_model(ckpt.config, ckpt.state_dict, device="cuda", dtype=torch.bfloat16).eval()
    texts = [torch.randn(b, 32, 64, generator=torch.Generator().manual_seed(b)) for b in (1, 2)]
    eager = SamplerSettings(chunk=2, window=6, seed=3)
    references = [rollout(model, text, frames=11, latent_size=(4, 6), settings=eager) for text in texts]
    torch._dynamo.reset()
    model.compile_blocks()
    fast = SamplerSettings(chunk=2, window=6, seed=3, graphs=True)
    for text, reference in zip(texts, references):
        out = rollout(model, text, frames=11, latent_size=(4, 6), settings=fast)
        torch.testing.assert_close(out.latents, reference.latents, atol=3e-2, rtol=3e-2)


def test_conversion_on_gpu_matches_cpu(tiny):
    cpu = convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="asvd"), device="cpu")
    gpu = convert_model(tiny, ConvertSettings(dc=32, rope_dim=16, init="asvd"), device="cuda")
    assert cpu.config.mla.rope_pairs == gpu.config.mla.rope_pairs
    for layer in range(tiny.config.num_layers):
        p = f"blocks.{layer}.self_attn."
        # Singular vectors are defined up to sign: compare the products the model uses.
        for up in ("k_up.weight", "v_up.weight"):
            a = cpu.state_dict[p + up] @ cpu.state_dict[p + "kv_down.weight"]
            b = gpu.state_dict[p + up] @ gpu.state_dict[p + "kv_down.weight"]
            assert ((a - b).norm() / a.norm()).item() < 1e-3
        assert gpu.layers[layer]["measured"]["attn_error"] == pytest.approx(cpu.layers[layer]["measured"]["attn_error"], rel=1e-2)


def test_sample_cli_on_gpu(cli, tmp_path):
    out = tmp_path / "s"
    r = cli("sample", "builtin:tiny-wan", "--random-text", "--frames", "6", "--height", "64", "--width", "64", "--window", "6", "-o", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "run.json").read_text())
    assert report["device"] != "cpu" and report["peak_memory_bytes"] > 0


def test_compiled_flex_attention_trains_like_the_boolean_mask(tiny_mla):
    """Teacher forcing on the GPU goes through compiled flex attention: same loss and gradients as SDPA + mask."""
    clean, text = (v.cuda() for v in inputs())
    noisy = torch.randn_like(clean)
    t = torch.full((2, 6), 700.0, device="cuda")
    grads = {}
    for backend in ("sdpa", "flex"):
        model = load_model(tiny_mla.config, tiny_mla.state_dict, device="cuda", attention_backend=backend)
        model(noisy, t, text, chunk_frames=2, clean=clean).pow(2).mean().backward()
        grads[backend] = model.blocks[0].self_attn.kv_down.weight.grad.clone()
    torch.testing.assert_close(grads["flex"], grads["sdpa"], atol=1e-4, rtol=1e-3)


def test_the_memory_plan_of_a_finetune_is_within_15_percent_of_its_peak(tmp_path):
    """A model big enough that activations and weights both count (dim 1024, 8 layers): the plan printed before
    the first step against the peak the steps reach. A caller's 256 MiB held on the GPU throughout are not
    the fine-tune's: its peak leaves them out, as the plan does."""
    from mlaconvert.checkpoints.builtin import make_tiny_wan
    from mlaconvert.checkpoints.formats import save_native
    from mlaconvert.conversion.convert import convert_source
    from mlaconvert.modeling.config import WanConfig
    from mlaconvert.training.finetune import FinetuneSettings, finetune

    config = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, in_dim=16, out_dim=16, text_dim=64, text_len=16)
    save_native(config, make_tiny_wan(0, config), tmp_path / "dense")
    convert_source(str(tmp_path / "dense"), tmp_path / "mla", ConvertSettings(dc=128, rope_dim=32, measure=False), device="cuda")
    plans = []
    callers = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    settings = FinetuneSettings(max_steps=3, batch=2, clips=4, held_out=2, frames=9, height=256, width=256, checkpoint_every=3)
    result = finetune(str(tmp_path / "mla"), tmp_path / "ft", settings, teacher=str(tmp_path / "dense"), device="cuda",
                      show_progress=False, on_plan=plans.append)
    peak = result.report["finetune"]["peak_memory_gib"]
    assert peak == pytest.approx(plans[0].total / 2**30, rel=0.15), plans[0].rows()
    del callers
    # The frozen tensors trained in bf16 beside float32 masters; the export keeps them as they were, bit for bit.
    from mlaconvert.training.objective import mla_parameter_names

    before, after = load_source(str(tmp_path / "mla")), load_source(str(tmp_path / "ft"))
    trained = mla_parameter_names(before.config)
    for name, tensor in before.state_dict.items():
        assert after.state_dict[name].dtype == tensor.dtype, name
        assert torch.equal(after.state_dict[name], tensor) != (name in trained), name
