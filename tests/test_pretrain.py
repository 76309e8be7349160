"""pretrain (the world model's training recipe) and the model it shipped: builtin:bouncing-balls."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mlaconvert.checkpoints.hub import load_source
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import world
from mlaconvert.inference.sampling import SamplerSettings, rollout
from mlaconvert.modeling.model import load_model
from mlaconvert.modeling.model import WanModel
from mlaconvert.training.pretrain import WORLD_MODEL, PretrainSettings, Run, init_weights, make_batch, own_rollout, pretrain, settings_from_recipe

TINY = PretrainSettings(
    max_steps=4, batch=2, frames=6, warmup=1, eval_every=2, checkpoint_every=2, eval_clips=2, compile=False,
    model=WORLD_MODEL.replace(dim=48, ffn_dim=96, num_layers=2, num_heads=2, world=world.WorldSettings(size=16, max_radius=3.0)),
)


def test_training_lowers_the_held_out_loss_and_writes_a_loadable_model(tmp_path):
    settings = dataclasses.replace(TINY, max_steps=12, lr=3e-3, eval_every=4)
    result = pretrain(tmp_path / "run", settings)
    assert result.finished and result.step == 12
    evals = [r["eval_loss"] for r in result.log if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < 0.8 * evals[0]  # steps 1, 4, 8, 12
    ckpt = load_source(str(tmp_path / "run"))
    assert ckpt.config == settings.model and all(v.dtype == torch.bfloat16 for v in ckpt.state_dict.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and (tmp_path / "run" / "loss.png").is_file()


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    settings = dataclasses.replace(TINY, own_context_steps=2)  # its rollouts' noise must resume too
    whole = pretrain(tmp_path / "whole", settings)
    assert [r["own_context"] for r in whole.log] == [False, False, True, True]
    part = pretrain(tmp_path / "part", settings, time_limit=0.0)  # stops after its first step, with a checkpoint
    assert not part.finished and part.step == 1
    with pytest.raises(MlaconvertError, match="--resume"):
        pretrain(tmp_path / "part", settings)
    resumed = pretrain(tmp_path / "part", settings, resume=True)
    assert resumed.finished and [r["loss"] for r in resumed.log] == [r["loss"] for r in whole.log]
    a = load_file(str(tmp_path / "whole" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MlaconvertError, match="differ"):
        pretrain(tmp_path / "part", dataclasses.replace(settings, lr=1.0, max_steps=8), resume=True)


def test_own_context_is_the_models_rollout_after_the_true_first_chunk_noised_like_the_clip():
    model = WanModel(TINY.model)
    init_weights(model, seed=3)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)  # a zero head would roll out pure noise
    batch = make_batch(TINY, 2, seed=5, device=torch.device("cpu"), context_noise=0.2)
    own = own_rollout(model, batch, seed=7)
    assert own.shape == batch.clean.shape and torch.equal(own[:, :, :3], batch.clean[:, :, :3])
    assert (own[:, :, 3:] - batch.clean[:, :, 3:]).abs().mean() > 0.1  # generated, not copied from the truth
    sigma = (batch.context_timesteps / 1000)[:, None, :, None, None]
    expected = (1 - sigma) * own + sigma * batch.context_noise
    assert torch.allclose(batch.with_context(own).context, expected)
    assert torch.allclose(batch.with_context(batch.clean).context, batch.context)
    # A share of the clips: the first see their own rollout, the rest keep the true context.
    mixed = batch.with_context(own[:1]).context
    assert torch.allclose(mixed[:1], expected[:1]) and torch.equal(mixed[1:], batch.context[1:])


def test_own_context_share_rolls_out_only_its_share_of_each_batch(monkeypatch):
    from mlaconvert.training import pretrain as recipe

    settings = dataclasses.replace(TINY, batch=4, own_context_steps=1, own_context_share=0.5, max_steps=1)
    rows = []
    monkeypatch.setattr(recipe, "own_rollout", lambda model, batch, seed: rows.append(len(batch.clean)) or batch.clean)
    Run(settings, torch.device("cpu")).train_step()
    assert rows == [2]
    with pytest.raises(MlaconvertError, match="own_context_share"):
        dataclasses.replace(settings, own_context_share=0.1).check()  # rounds to no clip at all


def test_a_run_can_start_from_the_weights_of_a_model_of_its_configuration(tmp_path):
    pretrain(tmp_path / "first", dataclasses.replace(TINY, max_steps=2))
    first = load_source(str(tmp_path / "first")).state_dict
    run = Run(dataclasses.replace(TINY, init=str(tmp_path / "first")), torch.device("cpu"))
    assert all(torch.equal(v, first[k].float()) for k, v in run.model.state_dict().items())
    other = dataclasses.replace(TINY, init="builtin:tiny-wan")
    with pytest.raises(MlaconvertError, match="not a model of the configuration"):
        Run(other, torch.device("cpu"))
    # The second stage's card tells both stages: the first card's training, then its own.
    pretrain(tmp_path / "second", dataclasses.replace(TINY, max_steps=2, lr=1e-4, init=str(tmp_path / "first")))
    first_training = (tmp_path / "first" / "README.md").read_text().split("## Training\n")[1].split("\n## ")[0].strip()
    second_training = (tmp_path / "second" / "README.md").read_text().split("## Training\n")[1].split("\n## ")[0]
    assert second_training.startswith(first_training) and "From scratch, 2 steps" in first_training
    assert "Then, from those weights, 2 steps" in second_training and '"lr": 0.0001' in second_training


def test_a_batch_is_the_world_noised_per_chunk_and_the_same_on_every_call():
    a = make_batch(TINY, 2, seed=5, device=torch.device("cpu"), context_noise=0.2)
    b = make_batch(TINY, 2, seed=5, device=torch.device("cpu"), context_noise=0.2)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("clean", "text", "noise", "timesteps", "context"))
    truth, caps, _ = world.clips(2, TINY.frames, 5, TINY.model.world)
    assert torch.equal(a.clean, truth) and torch.equal(a.text, world.embed_captions(caps, 16, 32))
    chunks = a.timesteps.unflatten(1, (-1, 3))
    assert (chunks == chunks[:, :, :1]).all() and len(set(a.timesteps[:, 0].tolist())) == 2  # one σ per chunk
    off = (a.context - a.clean).abs().amax(dim=(1, 3, 4))  # (B, F): how far the context was moved, per frame
    assert (off > 0).all() and (off < 0.2 * (1 + a.noise.abs().max() + a.clean.abs().max())).all()


def test_the_shipped_recipe_and_bad_settings():
    from mlaconvert.recipes import load_recipe

    settings = settings_from_recipe(load_recipe("bouncing-balls")["pretrain"])
    assert settings.model == WORLD_MODEL and settings.max_steps > 1000
    second = settings_from_recipe(load_recipe("bouncing-balls-own-context")["pretrain"])
    assert second.model == WORLD_MODEL and second.init and second.own_context_steps == second.max_steps
    assert 0 < second.own_context_rows < second.batch  # the clips left keep the true context
    assert settings_from_recipe({"model": {"num_layers": 2}}).model.num_layers == 2
    with pytest.raises(MlaconvertError, match="unknown setting"):
        settings_from_recipe({"max_step": 3})
    with pytest.raises(MlaconvertError, match="world"):
        dataclasses.replace(TINY, model=TINY.model.replace(world=None)).check()


@pytest.fixture(scope="module")
def bouncing_balls():
    ckpt = load_source("builtin:bouncing-balls")
    return ckpt.config, load_model(ckpt.config, {k: v.float() for k, v in ckpt.state_dict.items()}).eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4 / float(((a - b) ** 2).mean()))


def test_the_shipped_model_continues_a_true_prefix_better_than_standing_still(bouncing_balls):
    """Fails for untrained weights: the chunk after a true prefix, against the truth and the copy-last baseline."""
    config, model = bouncing_balls
    assert config.world is not None and config.text_encoder == "captions" and config.vae_stride == (1, 1, 1)
    truth, caps, _ = world.clips(4, 6, seed=2024, settings=config.world)
    text = world.embed_captions(caps, config.text_len, config.text_dim)
    sampler = SamplerSettings.for_model(config, steps=4)
    got = rollout(model, text, frames=3, latent_size=(32, 32), settings=sampler, prefix=truth[:, :, :3]).latents
    copy_last = truth[:, :, 2:3].expand(-1, -1, 3, -1, -1)
    assert psnr(got[:, :, 3:], truth[:, :, 3:]) > psnr(copy_last, truth[:, :, 3:]) + 1.5


def test_sample_continues_a_prefix_file_through_the_cli(cli, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    r = cli("sample", "builtin:bouncing-balls", "--prompt", "two balls: red, blue", "--frames", "3", "--steps", "2",
            "--device", "cpu", "-o", str(first))
    assert r.returncode == 0, r.stderr
    prefix = load_file(str(first / "latents.safetensors"))["latents"]
    assert prefix.shape == (1, 3, 3, 32, 32)  # the world's own frame size, no --height/--width needed
    r = cli("sample", "builtin:bouncing-balls", "--prompt", "two balls: red, blue", "--prefix", str(first / "latents.safetensors"),
            "--frames", "4", "--steps", "2", "--device", "cpu", "-o", str(second))
    assert r.returncode == 0, r.stderr
    latents = load_file(str(second / "latents.safetensors"))["latents"]
    assert latents.shape == (1, 3, 7, 32, 32) and torch.equal(latents[:, :, :3], prefix)
    report = json.loads((second / "run.json").read_text())
    assert report["prefix"]["frames"] == 3 and report["latent_frames"] == 4
    assert (second / "frames.png").is_file()  # pixels: the frames themselves, prefix included
    r = cli("sample", "builtin:bouncing-balls", "--prompt", "one ball: red", "--prefix", str(first / "latents.safetensors"),
            "--height", "64", "--device", "cpu", "-o", str(tmp_path / "third"))
    assert r.returncode == 1 and "cannot change that" in r.stderr and len(r.stderr.strip().splitlines()) == 1
