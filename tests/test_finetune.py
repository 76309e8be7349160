"""finetune: distillation really closes the gap to the teacher, trains only what it is told to, resumes
bit-exactly, gives one process's update when split over two (and stops both when one fails), and refuses bad
input with one line.

Everything runs the built-in tiny model converted at dc 32 on 6-frame 8x8-latent clips; the teacher-generated
clips are made once per module and reused through the cache folder, as a second run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlaconvert.checkpoints.builtin import TINY_WAN, make_tiny_wan
from mlaconvert.checkpoints.formats import save_native
from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_model, convert_source
from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.sampling import SamplerSettings, rollout
from mlaconvert.modeling.model import load_model
from mlaconvert.training.clips import Clips
from mlaconvert.training.finetune import FinetuneSettings, Trainer, finetune, load_pair
from mlaconvert.training.finetune_settings import check_settings
from mlaconvert.training.memory_plan import memory_plan
from mlaconvert.training.objective import AttentionOutputs, chunk_timesteps, context_draw, distill_loss, noised, mla_parameter_names, set_trainable, trainable_names
from mlaconvert.training.processes import Processes
from mlaconvert.training.training_run import derived_seed

SMALL = FinetuneSettings(max_steps=6, batch=2, lr=1e-3, warmup=2, clips=6, held_out=2, frames=6, height=64, width=64,
                         checkpoint_every=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    convert_source("builtin:tiny-wan", root / "mla", ConvertSettings(dc=32, rope_dim=16, measure=False))
    return root


def run(work: Path, name: str, settings: FinetuneSettings = SMALL, **kwargs) -> object:
    kwargs.setdefault("cache_dir", work / "clips")
    return finetune(str(work / "mla"), work / name, settings, show_progress=False, **kwargs)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_distillation_closes_the_gap_and_trains_only_the_mla_tensors(work: Path) -> None:
    settings = dataclasses.replace(SMALL, max_steps=30, warmup=3, checkpoint_every=10, eval_every=10)
    plans = []
    result = run(work, "long", settings, on_plan=plans.append)
    out = work / "long"

    losses = [row["loss"] for row in result.log[1:]]
    assert len(losses) == 30 and [row["step"] for row in result.log] == list(range(0, 31))
    # The fixed held-out objective: at the start, every eval_every (10) steps and the end, and it falls too.
    held = {row["step"]: row["eval_loss"] for row in result.log if "eval_loss" in row}
    assert sorted(held) == [0, 10, 20, 30] and held[30] < held[0]
    # Each step draws its own timesteps, so single losses are noisy: compare the first and last ten.
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    agreement = json.loads((out / "agreement.json").read_text())
    before, after = agreement["before"], agreement["after"]
    assert len(before["flow_relative_error"]) == 4 and len(before["rollout_psnr_db"]) == 2  # 4 steps, 2 chunks
    assert all(a < b for a, b in zip(after["flow_relative_error"], before["flow_relative_error"]))
    assert after["rollout_psnr_db_mean"] > before["rollout_psnr_db_mean"]

    student, tuned = weights(work / "mla"), weights(out)
    config = load_source(str(work / "mla")).config
    mla = set(trainable_names(config, list(student), "mla"))
    assert mla == mla_parameter_names(config)
    for name, tensor in student.items():
        if name in mla:
            assert not torch.equal(tuned[name], tensor), name
        else:
            assert torch.equal(tuned[name], tensor), name

    # The export is a valid SOURCE with a fresh rank report: utilisation on held-out latents, before and after.
    assert load_source(str(out)).config == load_source(str(work / "mla")).config
    report = json.loads((out / "rank_report.json").read_text())
    assert report["finetune"]["after"]["agreement"] == after
    assert report["layers"][0]["mla"]["utilisation"]["latents"]["effective_rank"] > 0
    assert len(report["finetune"]["before"]["utilisation"]) == TINY_WAN.num_layers
    assert report["finetune"]["model_flops_per_step"] > 0
    assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoint" / "state.pt").is_file()

    # The memory plan, heard before the first step and kept in the report, counts the tensors there are: float32
    # on the CPU, the trained ones with a gradient and two AdamW moments each.
    (plan,) = plans
    assert report["finetune"]["memory_plan"] == plan.to_dict()
    trained = sum(student[n].numel() for n in mla) * 4
    assert (plan.student_trained, plan.gradients, plan.optimizer) == (trained, trained, 2 * trained)
    assert plan.student_frozen == sum(t.numel() for n, t in student.items() if n not in mla) * 4
    assert plan.teacher_weights == sum(t.numel() for t in load_source("builtin:tiny-wan").state_dict.values()) * 4
    assert plan.activations > 0


def test_resume_after_a_kill_is_bit_exact_and_refuses_another_run(work: Path) -> None:
    # The hooked layer term must resume exactly too; the evaluation at step 4 lies after the kill's checkpoint.
    settings = dataclasses.replace(SMALL, layer_loss_weight=0.5, eval_every=4)
    whole = run(work, "whole", settings)
    assert all(row["loss"] > row["flow_loss"] > 0 and row["layer_loss"] > 0 for row in whole.log[1:])
    # A kill after step 3: the last checkpoint is step 2's, step 3 is lost and must be redone identically.
    stopped = run(work, "killed", settings, stop_after=3)
    assert not stopped.exported and not (work / "killed" / "model.safetensors").exists()
    with pytest.raises(MlaconvertError, match="another run.*lr"):
        run(work, "killed", dataclasses.replace(settings, lr=2e-3), resume=True)
    with pytest.raises(MlaconvertError, match="already holds a finetune run: pass --resume"):
        run(work, "killed", settings)
    # Step 4's row half-written, as a kill in the middle of its line leaves it: left out, and redone.
    with (work / "killed" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.')
    resumed = run(work, "killed", settings, resume=True)

    a, b = weights(work / "whole"), weights(work / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def fields(rows):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss")) for r in rows]

    assert fields(resumed.log) == fields(whole.log)
    log = [json.loads(line) for line in (work / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(0, 7))
    # eval_loss (every 4 steps, and the end): the same clips, noise and timesteps, so only the weights change it.
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 4, 6]


def test_a_training_log_damaged_before_its_last_line_is_a_one_line_error(tmp_path: Path) -> None:
    from mlaconvert.training.training_run import trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(MlaconvertError, match="train_log.jsonl' is damaged: line 2 is not JSON"):
        trim_log(log, 2)


def test_the_export_keeps_the_checkpoint_that_scores_best_over_the_long_horizon(work: Path) -> None:
    # A learning rate that wrecks the student: the best long-horizon check is the one before training.
    settings = dataclasses.replace(SMALL, max_steps=4, lr=5.0, warmup=0, grad_clip=1e3, horizon_frames=12, horizon_clips=2)
    whole = run(work, "horizon", settings)
    checks = whole.report["finetune"]["horizon"]["checks"]
    assert [c["step"] for c in checks] == [0, 2, 4]  # before training and at every checkpoint
    teacher = whole.report["finetune"]["horizon"]["teacher_psnr_db"]
    for check in checks:
        assert len(check["psnr_db"]) == len(teacher) >= 1 and check["score"] == max(check["gaps_db"])
        assert check["gaps_db"] == pytest.approx([t - p for t, p in zip(teacher, check["psnr_db"])])
    kept = whole.report["finetune"]["horizon"]["kept_step"]
    assert kept == min(checks, key=lambda c: c["score"])["step"] == 0
    converted, exported = weights(work / "mla"), weights(work / "horizon")
    assert all(torch.equal(converted[k], exported[k]) for k in converted)
    # Killed between checkpoints and resumed, the run keeps the same best and exports the same weights.
    run(work, "horizon-killed", settings, stop_after=3)
    with pytest.raises(MlaconvertError, match="checkpoint_every"):  # where the checks fall is part of the run now
        run(work, "horizon-killed", dataclasses.replace(settings, checkpoint_every=1), resume=True)
    resumed = run(work, "horizon-killed", settings, resume=True)
    assert resumed.report["finetune"]["horizon"] == whole.report["finetune"]["horizon"]
    assert all(torch.equal(exported[k], v) for k, v in weights(work / "horizon-killed").items())


def test_checkpointing_gives_the_same_gradients_with_the_layer_term(work: Path) -> None:
    # The attention hooks are removed before backward, so checkpointing's recomputation records nothing twice.
    student_ckpt, teacher_ckpt = load_pair(str(work / "mla"))
    student = load_model(student_ckpt.config, {k: v.clone() for k, v in student_ckpt.state_dict.items()})
    teacher = load_model(teacher_ckpt.config, teacher_ckpt.state_dict).requires_grad_(False)
    trained = set(trainable_names(student.config, [n for n, _ in student.named_parameters()], "mla"))
    for name, param in student.named_parameters():
        param.requires_grad_(name in trained)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 6, 8, 8, generator=g), torch.randn(2, 4, 6, 8, 8, generator=g)
    text, t = torch.randn(2, 32, 64, generator=g), chunk_timesteps(SMALL.for_model(TINY_WAN), 2, 6, g)
    grads = []
    for checkpointing in (False, True):
        student.gradient_checkpointing = checkpointing
        student.zero_grad()
        loss, parts = distill_loss(student, teacher, clean, text, noise, t, sampler=SamplerSettings(), layer_loss_weight=0.5,
                                   student_attn=AttentionOutputs(student), teacher_attn=AttentionOutputs(teacher))
        loss.backward()
        assert parts["layer_loss"] > 0
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == trained
    for name in trained:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-9)


def test_two_processes_make_the_update_of_one_whole_or_sharded_killed_and_resumed(work: Path) -> None:
    """Two processes (torchrun, gloo) in one group. DDP: each a whole copy of the models, half the batch. FSDP2:
    teacher and student sharded, stopped after step 1 as a kill would, resumed from that checkpoint, with every
    tensor trained (the root's too, which FSDP2 handles apart from the blocks'), over two micro-batches, with the
    gradient clipped. Each export equals one process's to float32 reduction-order noise."""
    whole = dataclasses.replace(SMALL, max_steps=2)
    sharded = dataclasses.replace(SMALL, max_steps=2, batch=4, accumulate=2, train="all", grad_clip=0.01)
    run(work, "single", whole)
    run(work, "single-all", sharded)

    def fields(settings: FinetuneSettings, **changes: object) -> dict[str, object]:
        return {**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "sampler"}, **changes}

    runs = {"ddp": [str(work / "ddp"), fields(whole)],
            "sharded": [str(work / "sharded"), fields(sharded, checkpoint_every=1, shard=True)]}
    script = Path(__file__).with_name("sharded_finetune.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(work / "mla"), str(work / "clips"), str(work / "findings"), json.dumps(runs)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((work / f"findings.{rank}.json").read_text())
        # DDP leaves the parameters whole; --shard splits teacher and student, in both of its runs.
        assert seen["parameters"] == [["Parameter"], ["DTensor"], ["DTensor"]]
        assert seen["steps"] == [1, False, 2, True]
        assert seen["mixed"] == ["DTensor torch.bfloat16 grad None"] * 2 + ["DTensor torch.float32 grad torch.float32"] * 2
        assert seen["frozen_gathered_whole"]
    start = weights(work / "mla")
    for one, two in (("single", "ddp"), ("single-all", "sharded")):
        one, two = weights(work / one), weights(work / two)
        assert any(not torch.equal(one[n], start[n]) for n in one)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    for name, shard in (("ddp", False), ("sharded", True)):
        report = json.loads((work / name / "rank_report.json").read_text())["finetune"]
        assert report["processes"] == 2 and report["settings"]["shard"] == shard


def test_a_sharded_plan_holds_a_share_of_each_tensor_and_two_whole_blocks(work: Path) -> None:
    student, teacher = load_source(str(work / "mla")), load_source("builtin:tiny-wan")
    trained = sorted(mla_parameter_names(student.config))
    shape = {"clip_tokens": 96, "rows": 1, "dtype_bytes": 2}
    one = memory_plan(student.config, teacher.config, trained, **shape)
    two = memory_plan(student.config, teacher.config, trained, processes=2, sharded=True, **shape)

    def count(state: dict[str, torch.Tensor], keep=lambda name: True) -> int:
        return sum(t.numel() for n, t in state.items() if keep(n))

    half = -(-count(student.state_dict, lambda n: n in trained) // 2) * 4
    assert (two.student_trained, two.gradients, two.optimizer) == (half, half, 2 * half)
    assert two.teacher_weights == -(-count(teacher.state_dict) // 2) * 2
    assert two.activations == one.activations and one.gathered == 0
    assert "blocks gathered whole (sharded)" in [what for what, _ in two.rows()] and len(one.rows()) == len(two.rows()) - 1

    def unit(state: dict[str, torch.Tensor], inside) -> int:  # frozen in the compute dtype, trained in float32
        return count(state, lambda n: inside(n) and n not in trained) * 2 + count(state, lambda n: inside(n) and n in trained) * 4

    blocks = [unit(s.state_dict, lambda n, i=i: n.startswith(f"blocks.{i}.")) for s in (student, teacher) for i in range(2)]
    roots = sum(unit(s.state_dict, lambda n: not n.startswith("blocks.")) for s in (student, teacher))
    reduced = max(count(student.state_dict, lambda n, i=i: n.startswith(f"blocks.{i}.") and n in trained) for i in range(2)) * 4
    assert two.gathered == 2 * max(blocks) + roots + reduced
    # Micro-batches before a step's last keep whole gradients: FSDP2 reduce-scatters them only with the last.
    accumulating = memory_plan(student.config, teacher.config, trained, processes=2, sharded=True, accumulate=2, **shape)
    assert accumulating.gradients == two.gradients + count(student.state_dict, lambda n: n in trained) * 4


def test_a_failure_on_rank_0_ends_every_process_at_once(work: Path, tmp_path: Path) -> None:
    # Two plain processes, no torchrun agent to stop the second: rank 0's failure itself must reach it (here in
    # the writing rank 0 does alone: an earlier run's log it cannot remove), not the group's hours-long timeout.
    (tmp_path / "out" / "train_log.jsonl").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "mlaconvert", "finetune", str(work / "mla"), "-o", str(tmp_path / "out"), "--force",
               "--device", "cpu", "--batch", "2", "--clips", "6", "--frames", "6", "--height", "64", "--width", "64",
               "--cache-dir", str(work / "clips")]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert "Traceback" in errors[0] and "train_log.jsonl" in errors[0]  # not an input error: it keeps its traceback
    assert errors[1].strip().count("\n") == 0 and "process 0 failed" in errors[1]


def test_cli_finetunes_the_builtin_and_refuses_to_overwrite(work: Path) -> None:
    command = [
        sys.executable, "-m", "mlaconvert", "finetune", str(work / "mla"), "-o", str(work / "cli"), "--recipe", "recipes/tiny-wan.toml",
        "--max-steps", "2", "--clips", "6", "--frames", "6", "--height", "64", "--width", "64", "--cache-dir", str(work / "clips"),
    ]
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 steps" in done.stdout and "rollout PSNR" in done.stdout
    assert json.loads((work / "cli" / "rank_report.json").read_text())["finetune"]["settings"]["lr"] == 1e-3  # from the recipe
    again = subprocess.run(command, capture_output=True, text=True, cwd=repo, timeout=300)
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "already holds a finetune run" in again.stderr


def test_bad_inputs_are_one_line_errors(work: Path, tmp_path: Path) -> None:
    with pytest.raises(MlaconvertError, match="dense model; finetune needs an MLA export"):
        finetune("builtin:tiny-wan", tmp_path / "a", SMALL, show_progress=False)

    wider = dataclasses.replace(TINY_WAN, dim=96, num_heads=3, ffn_dim=192)
    other = save_native(wider, make_tiny_wan(0, wider), tmp_path / "wider")
    with pytest.raises(MlaconvertError, match="does not match the student.*dim 96 vs 192"):
        run(work, "b", teacher=str(other))

    clips = tmp_path / "clips"
    clips.mkdir()
    save_file({"latents": torch.zeros(3, 5, 6, 8, 8), "prompt_embeds": torch.zeros(3, 32, 64)}, clips / "x.safetensors")
    with pytest.raises(MlaconvertError, match=r"clips must be \(clips, 4 channels"):
        run(work, "c", data=clips)

    with pytest.raises(MlaconvertError, match="nothing to resume"):
        run(work, "d", resume=True)
    with pytest.raises(MlaconvertError, match="must divide evenly"):
        run(work, "e", dataclasses.replace(SMALL, batch=3, accumulate=2))
    with pytest.raises(MlaconvertError, match="own-context is a share"):
        run(work, "f", dataclasses.replace(SMALL, own_context=1.5))
    with pytest.raises(MlaconvertError, match="own-context cannot be combined with --shard"):
        check_settings(dataclasses.replace(SMALL, own_context=0.5, frames=6, shard=True), processes=2)
    with pytest.raises(MlaconvertError, match="must reach past the training clip"):
        run(work, "g", dataclasses.replace(SMALL, horizon_frames=3))


def test_each_chunk_gets_one_timestep_from_the_sampler() -> None:
    warped = [1000.0, 937.5, 833.3333333333334, 625.0]  # [1000, 750, 500, 250] through shift 5
    g = torch.Generator().manual_seed(0)
    resolved = SMALL.for_model(TINY_WAN)  # the tiny model's own sampler: 4 steps, shift 5, chunks of 3
    listed = chunk_timesteps(resolved, 64, 7, g)  # 7 frames: chunks of 3, 3 and 1
    assert listed.shape == (64, 7)
    assert torch.equal(listed[:, 0:3], listed[:, :1].expand(64, 3)) and torch.equal(listed[:, 3:6], listed[:, 3:4].expand(64, 3))
    assert set(listed.flatten().tolist()) == set(torch.tensor(warped).tolist())
    uniform = chunk_timesteps(dataclasses.replace(resolved, timestep_mode="uniform"), 64, 6, g)
    assert uniform.min() >= 625.0 and uniform.max() <= 1000.0 and len(set(uniform[:, 0].tolist())) == 64


def test_the_sampler_defaults_to_the_models_own_and_options_override_it() -> None:
    own = SMALL.for_model(TINY_WAN)
    assert (own.sampler.chunk, own.sampler.timesteps, own.sampler.shift) == (3, (1000.0, 750.0, 500.0, 250.0), 5.0)
    two = dataclasses.replace(SMALL, sampler_steps=2, shift=1.0).for_model(TINY_WAN)
    assert two.sampler.timesteps == (1000.0, 500.0) and two.sampler.shift == 1.0
    with pytest.raises(MlaconvertError, match="--steps and --timesteps"):
        dataclasses.replace(SMALL, sampler_steps=2, sampler_timesteps=(1000, 500)).for_model(TINY_WAN)


@pytest.mark.parametrize("q_rank", [None, 96])
def test_train_mla_trains_every_tensor_conversion_creates(q_rank: int | None) -> None:
    dense = load_source("builtin:tiny-wan")
    mla = convert_model(dense, ConvertSettings(dc=32, rope_dim=16, q_rank=q_rank, measure=False))
    student = load_model(mla.config, mla.state_dict)
    trained = set(set_trainable(student, "mla"))
    # Independent of the code under test: the tensors the export has and the dense source has not, by name.
    created = set(mla.state_dict) - set(dense.state_dict)
    assert trained == created
    assert {p for p in created if ".q_down." in p or ".q_up." in p} == (
        {f"blocks.{i}.self_attn.{n}" for i in range(2) for n in ("q_down.weight", "q_up.weight", "q_up.bias")} if q_rank else set()
    )
    assert all(p.requires_grad == (n in created) for n, p in student.named_parameters())


def small_trainer(work: Path, settings: FinetuneSettings = SMALL) -> Trainer:
    """A Trainer on the converted tiny model with random clips: the loop without generation, agreement or export."""
    student_ckpt, teacher_ckpt = load_pair(str(work / "mla"))
    student = load_model(student_ckpt.config, {k: v.clone() for k, v in student_ckpt.state_dict.items()})
    teacher = load_model(teacher_ckpt.config, teacher_ckpt.state_dict)
    g = torch.Generator().manual_seed(3)
    clips = Clips(torch.randn(4, 4, 6, 8, 8, generator=g), torch.randn(4, 32, 64, generator=g), {})
    trainer = Trainer(student, teacher, settings.for_model(student_ckpt.config), Processes(0, 1, torch.device("cpu"), False))
    trainer.clips = clips
    return trainer


def test_the_key_energy_form_stays_positive_semidefinite_at_a_large_learning_rate(work: Path) -> None:
    trainer = small_trainer(work, dataclasses.replace(SMALL, lr=5.0, warmup=0, grad_clip=1e3, gradient_checkpointing=False))
    start = [b.self_attn.k_rope_norm.detach().clone() for b in trainer.student.blocks]
    for _ in range(4):
        assert math.isfinite(trainer.step()["loss"])
    for block, first in zip(trainer.student.blocks, start):
        f = block.self_attn.k_rope_norm.detach().double().numpy()
        assert not np.allclose(f, first.numpy())  # the step did move it
        assert np.linalg.eigvalsh((f + f.transpose(0, 2, 1)) / 2).min() >= -1e-5 * np.abs(f).max()
        np.testing.assert_allclose(f, f.transpose(0, 2, 1), atol=1e-6)
    # A converted form is PSD already: projecting it changes nothing, so exports from before still train the same.
    for block, form in zip(small_trainer(work).student.blocks, start):
        block.self_attn.project_key_form()
        torch.testing.assert_close(block.self_attn.k_rope_norm.detach(), form, rtol=1e-6, atol=1e-6)


def test_held_out_loss_depends_only_on_the_weights(work: Path) -> None:
    trainer = small_trainer(work)
    student, teacher, clips = trainer.student, trainer.teacher, trainer.clips
    student_ckpt = load_source(str(work / "mla"))
    first = trainer.held_out_loss()
    trainer.step()  # draws its own noise; must not move the held-out draw
    assert trainer.held_out_loss() != first
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(student_ckpt.state_dict[name])
    assert trainer.held_out_loss() == first
    # The reference: the objective on the last held_out clips with the run's fixed seeded draw, by hand.
    gen = torch.Generator().manual_seed(derived_seed(SMALL.seed, "eval", 0))
    t = chunk_timesteps(SMALL.for_model(TINY_WAN), 2, 6, gen)
    noise = torch.randn(2, 4, 6, 8, 8, generator=gen)
    with torch.no_grad():
        expected = np.mean([float(distill_loss(student, teacher, clips.latents[i:i + 1], clips.text[i:i + 1], noise[i - 2:i - 1],
                                               t[i - 2:i - 1], sampler=SamplerSettings())[0]) for i in (2, 3)])
    assert first == pytest.approx(expected, rel=1e-6)


def test_own_context_replaces_its_share_of_the_batch_with_the_students_own_rollout(work: Path) -> None:
    trainer = small_trainer(work, dataclasses.replace(SMALL, batch=4, own_context=0.5))
    clean, text, chunk = trainer.clips.latents, trainer.clips.text, trainer.settings.sampler.chunk
    mixed = trainer._with_own_context(clean, text, slice(0, 4))
    # The reference: the cached sampler continuing each clip's true first chunk, with the step's seed.
    sampler = dataclasses.replace(trainer.settings.sampler, seed=derived_seed(SMALL.seed, "own/0", 0))
    expected = rollout(trainer.student, text[:2], frames=6 - chunk, latent_size=(8, 8), settings=sampler,
                       prefix=clean[:2, :, :chunk]).latents
    torch.testing.assert_close(mixed[:2], expected)
    assert torch.equal(mixed[:2, :, :chunk], clean[:2, :, :chunk]) and not torch.allclose(mixed[:2], clean[:2])
    assert torch.equal(mixed[2:], clean[2:])  # the rest of the batch keeps the true clips
    # Micro-batches: one past the share keeps its clips, one across it replaces only the rows before it.
    assert torch.equal(trainer._with_own_context(clean[2:], text[2:], slice(2, 4)), clean[2:])
    assert torch.equal(trainer._with_own_context(clean[1:3], text[1:3], slice(1, 3))[1:], clean[2:3])
    assert math.isfinite(trainer.step()["loss"])


def test_context_noise_is_the_context_teacher_and_student_both_see(work: Path) -> None:
    settings = dataclasses.replace(SMALL, context_noise=0.5)
    trainer = small_trainer(work, settings)
    student, teacher, clips, s = trainer.student, trainer.teacher, trainer.clips, trainer.settings
    # The reference: the step's draws in their order, the context noised per chunk, the loss by hand.
    gen = torch.Generator().manual_seed(derived_seed(SMALL.seed, "step", 0))
    index = trainer._clip_indices(0, 2)
    clean = clips.latents[index]
    t = chunk_timesteps(s, 2, 6, gen)
    noise = torch.randn(clean.shape, generator=gen)
    ctx_noise, ctx_t = context_draw(s, clean.shape, gen)
    assert 0 <= float(ctx_t.min()) and float(ctx_t.max()) <= 500 and torch.equal(ctx_t[:, :3], ctx_t[:, :1].expand(2, 3))
    with torch.no_grad():
        expected = distill_loss(student, teacher, clean, clips.text[index], noise, t, sampler=s.sampler,
                                context=noised(clean, ctx_noise, ctx_t))[0]
        plain = distill_loss(student, teacher, clean, clips.text[index], noise, t, sampler=s.sampler)[0]
    assert trainer.step()["loss"] == pytest.approx(float(expected), rel=1e-5) and float(expected) != pytest.approx(float(plain), rel=1e-3)
    assert context_draw(SMALL.for_model(TINY_WAN), clean.shape, gen) is None  # off: nothing drawn, old runs unchanged


def test_loss_picture_names_every_curve() -> None:
    from mlaconvert.training.training_run import loss_figure

    rows = [{"step": 0, "eval_loss": 0.5}] + [{"step": s, "loss": 1 / s, "flow_loss": 1 / s, "lr": 1e-3, "eval_loss": 0.4} for s in (1, 2)]
    fig = loss_figure(rows)
    fig.canvas.draw()
    curves = [line for ax in fig.axes for line in ax.get_lines()]
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {line.get_label() for line in curves}
    assert any("learning rate" in line.get_label() for line in curves) and any("held-out" in line.get_label() for line in curves)
