"""`study`: a grid of (init, dc) cells on a world model, each converted, evaluated, fine-tuned and evaluated again."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.checkpoints.formats import save_native
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import world
from mlaconvert.evaluation.evaluate import EvalSettings, run_eval
from mlaconvert.evaluation.study import StudySettings, gaps_db, headline_candidate, reaches, study
from mlaconvert.modeling.config import SamplerDefaults, WanConfig
from mlaconvert.training.finetune import FinetuneSettings

EVAL = EvalSettings(clips=2, frames=6, batch=2, edges=(6, 9), agreement_clips=1, strip_clips=1)
FINETUNE = FinetuneSettings(batch=1, clips=3, held_out=1, frames=6, warmup=1, checkpoint_every=1, eval_every=10)
GRID = StudySettings(dc=("4", "8"), init=("svd",), rope_dim=8, max_steps=2, headline_steps=3, headline_cache=0.4,
                     remedies={"noisy context": {"context_noise": 0.2, "rope_dim": 12, "max_steps": 2}})


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    config = WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=32, text_len=16,
                       freq_dim=16, vae_stride=(1, 1, 1), text_encoder="captions",
                       world=world.WorldSettings(size=16, max_radius=3.0),
                       sampler=SamplerDefaults(steps=2, shift=1.0, chunk=3, window=9))
    folder = tmp_path_factory.mktemp("world") / "model"
    save_native(config, make_tiny_wan(0, config), folder)
    return str(folder)


@pytest.fixture(scope="module")
def finished(world_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    stages = []
    result = study(world_model, out, GRID, finetune=FINETUNE, evaluation=EVAL, device="cpu",
                   on_stage=lambda cell, stage: stages.append((cell, stage)))
    return out, result, stages


def test_the_study_holds_every_cell_the_dense_row_and_the_headline(finished):
    out, result, _ = finished
    saved = json.loads((out / "study.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["schema"] == "mlaconvert.study/1"
    assert [(c["init"], c["dc"]) for c in saved["cells"]] == [("svd", "4"), ("svd", "8")]
    buckets = [h["frames"] for h in saved["dense"]["horizons"]]
    assert buckets == [[3, 6], [6, 9]]
    for cell in saved["cells"]:
        assert [h["frames"] for h in cell["before"]["horizons"]] == buckets == [h["frames"] for h in cell["after"]["horizons"]]
        assert cell["finetune_steps"] == 2 and cell["finetune_seconds"] > 0
        # Cache: (dc + rope_dim) values per token and layer against dense's 2 * dim.
        assert cell["cache_fraction"] == pytest.approx((int(cell["dc"]) + 8) / (2 * 48))
        assert len(cell["latent_utilisation"]["after"]) == 2 and len(cell["spectral_error_at_dc"]) == 2
    assert saved["dense"]["effective_rank"] and len(saved["dense"]["rank_budget"]) == 2
    headline, runs = saved["headline"], saved["headline_runs"]
    # The headline is the best of its runs: the recipe's fine-tune and each remedy, on the same (init, dc).
    assert [r.get("remedy") for r in runs] == [None, "noisy context"] and [r["finetune_steps"] for r in runs] == [3, 2]
    assert {(r["init"], r["dc"]) for r in runs} == {(headline["init"], headline["dc"])} and headline["cache_fraction"] <= 0.4
    assert headline == min(runs, key=lambda r: (not r["reached"], not r["keeps_the_balls"], max(r["gaps_db"])))
    tuned = json.loads((out / runs[1]["folder"] / "finetuned" / "rank_report.json").read_text())
    assert tuned["finetune"]["settings"]["context_noise"] == 0.2
    assert runs[1]["overrides"] == {"context_noise": 0.2, "rope_dim": 12}
    # The remedy's rope_dim converts the cell again with that rope key: a larger cache than the grid's.
    assert runs[1]["rope_dim"] == 12 and runs[1]["cache_fraction"] == pytest.approx((int(runs[1]["dc"]) + 12) / (2 * 48))
    kept = all(k >= d - 0.1 for k, d in zip(headline["after"]["count_kept"], saved["dense"]["count_kept"]))
    assert headline["keeps_the_balls"] == kept and headline["reached"] == (max(headline["gaps_db"]) <= 0.5 and kept)
    assert (headline["init"], headline["dc"]) == (headline_candidate(saved)["init"], headline_candidate(saved)["dc"])
    for name in ("study.png", "strip.png", "settings.json"):
        assert (out / name).stat().st_size > 0
    tables = (out / "study.md").read_text()
    for row in [*saved["cells"], headline]:
        after = " | ".join(f"{h['psnr_db']:.2f}" for h in row["after"]["horizons"])
        assert f"| {row['init']} dc {row['dc']} |" in tables and after in tables
    assert " | ".join(f"{h['psnr_db']:.2f}" for h in saved["dense"]["horizons"]) in tables
    assert ("**reached**" if headline["reached"] else "**not reached**") in tables
    assert "| noisy context (context_noise 0.2, rope_dim 12, 2 steps) | 20.8% |" in tables and "| headline fine-tune, 3 steps |" in tables


def _row(init: str, psnr: list[float], kept: list[float], cache: float = 0.05) -> dict:
    return {"init": init, "cache_fraction": cache, "after": {"horizons": [{"psnr_db": p} for p in psnr], "count_kept": kept}}


def test_the_headline_candidate_keeps_the_balls_before_it_is_close_in_psnr():
    # A blank rollout scores above dense in PSNR on small balls; the headline must find them as dense does.
    dense = {"horizons": [{"psnr_db": 14.0}, {"psnr_db": 13.0}], "count_kept": [0.4, 0.3]}
    blank = _row("svd", [13.9, 13.5], [0.0, 0.0])
    keeps = _row("asvd", [13.0, 12.0], [0.35, 0.25])
    too_big = _row("random", [14.0, 13.0], [0.4, 0.3], cache=0.2)
    result = {"settings": {"study": {"headline_cache": 0.1}}, "dense": dense, "cells": [blank, keeps, too_big]}
    assert headline_candidate(result) is keeps
    result["cells"] = [blank, too_big]
    assert headline_candidate(result) is blank  # none keeps them: the closest in PSNR, still within the cache
    assert gaps_db(keeps, dense) == pytest.approx([1.0, 1.0])


def test_the_strip_shows_the_smallest_dc_that_finds_the_balls_most_often():
    from mlaconvert.evaluation.study_report import shown_cells

    cells = [{**_row(init, psnr, kept), "dc": dc, "folder": f"cells/{init}-dc{dc}"}
             for init, dc, psnr, kept in [("svd", "8", [13.7], [0.0]), ("asvd", "8", [13.0], [0.3]),
                                          ("svd", "64", [14.2], [0.1]), ("asvd", "64", [13.5], [0.3])]]
    assert [c["folder"] for c in shown_cells({"cells": cells, "headline": None})] == ["cells/asvd-dc8", "cells/asvd-dc64"]


def test_the_cells_numbers_are_what_eval_reports_for_the_same_export(finished, tmp_path):
    out, result, _ = finished
    cell = result["cells"][1]
    report = run_eval(str(out / cell["folder"] / "finetuned"), tmp_path / "eval", settings=EVAL, device="cpu")
    assert report["horizons"] == cell["after"]["horizons"]
    dense = run_eval(result["model"], tmp_path / "dense", settings=EVAL, device="cpu")
    assert dense["horizons"] == result["dense"]["horizons"]
    assert gaps_db(cell, result["dense"]) == [d["psnr_db"] - c["psnr_db"] for d, c in zip(dense["horizons"], report["horizons"])]


def test_a_killed_study_carries_on_without_redoing_finished_cells(world_model, finished, tmp_path, monkeypatch):
    out, _, stages = finished
    assert ("svd-dc4", "convert") in stages and ("dense", "eval") in stages
    # The same study again: every cell is done, nothing runs.
    again = []
    study(world_model, out, GRID, finetune=FINETUNE, evaluation=EVAL, device="cpu", on_stage=lambda c, s: again.append((c, s)))
    assert again == []
    # A study killed in its second cell's fine-tune: the first cell is kept, the second's export and checkpoint too.
    from mlaconvert.training import finetune as finetune_module

    partial = tmp_path / "partial"
    original = finetune_module.finetune

    def killed(model, output, settings, **kwargs):
        if "dc8" in str(output):
            original(model, output, settings, stop_after=1, **kwargs)
            raise KeyboardInterrupt
        return original(model, output, settings, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", killed)
    small = StudySettings(dc=GRID.dc, init=GRID.init, rope_dim=8, max_steps=2, headline_steps=0)
    with pytest.raises(KeyboardInterrupt):
        study(world_model, partial, small, finetune=FINETUNE, evaluation=EVAL, device="cpu")
    assert (partial / "cells" / "svd-dc4" / "cell.json").is_file() and not (partial / "cells" / "svd-dc8" / "cell.json").exists()
    monkeypatch.setattr(finetune_module, "finetune", original)
    resumed = []
    result = study(world_model, partial, small, finetune=FINETUNE, evaluation=EVAL, device="cpu", on_stage=lambda c, s: resumed.append((c, s)))
    assert [s for s in resumed if s[0] == "svd-dc4"] == []  # finished: not redone
    assert ("svd-dc8", "convert") not in resumed and ("svd-dc8", "finetune 2 steps") in resumed
    log = [json.loads(line) for line in (partial / "cells" / "svd-dc8" / "finetuned" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # resumed after step 1, not started over
    assert result["headline"] is None and len(result["cells"]) == 2 and all(math.isfinite(h["psnr_db"]) for h in result["cells"][1]["after"]["horizons"])


def test_cells_shared_among_worker_processes_are_the_cells_of_one_process(world_model, finished, tmp_path):
    out, result, _ = finished
    shared = dataclasses.replace(GRID, headline_steps=0, workers=2)
    stages = []
    parallel = study(world_model, tmp_path / "shared", shared, finetune=FINETUNE, evaluation=EVAL, device="cpu",
                     on_stage=lambda c, s: stages.append((c, s)))
    assert [c for c, _ in stages] == ["dense"]  # the cells ran in the two worker processes, not here
    for one, two in zip(result["cells"], parallel["cells"], strict=True):
        for stage in ("before", "after"):
            assert [h["psnr_db"] for h in two[stage]["horizons"]] == pytest.approx([h["psnr_db"] for h in one[stage]["horizons"]], abs=1e-3)
    # How many processes ran it is not part of the study: the same folder carries on with one.
    again = []
    study(world_model, tmp_path / "shared", dataclasses.replace(shared, workers=1), finetune=FINETUNE, evaluation=EVAL,
          device="cpu", on_stage=lambda c, s: again.append((c, s)))
    assert again == []


def test_a_run_over_the_cache_cap_does_not_reach_the_headline_however_close() -> None:
    dense = {"horizons": [{"psnr_db": 10.0}, {"psnr_db": 9.0}], "count_kept": [0.5, 0.4]}
    cell = {"after": {"horizons": [{"psnr_db": 9.8}, {"psnr_db": 9.1}], "count_kept": [0.45, 0.4]}, "cache_fraction": 0.2}
    assert reaches(cell, dense, margin_db=0.5, cache_cap=0.25)
    assert not reaches(cell, dense, margin_db=0.5, cache_cap=0.1)
    assert not reaches(cell, dense, margin_db=0.1, cache_cap=0.25)  # 0.2 dB below dense in the first bucket
    lost = {**cell, "after": {**cell["after"], "count_kept": [0.2, 0.4]}}
    assert not reaches(lost, dense, margin_db=0.5, cache_cap=0.25)  # balls lost


def test_bad_studies_are_refused_before_any_work(world_model, finished, tmp_path):
    with pytest.raises(MlaconvertError, match="choose from"):
        study(world_model, tmp_path / "a", StudySettings(init=("svd", "pca")), device="cpu")
    with pytest.raises(MlaconvertError, match="lr_typo is not a"):
        study(world_model, tmp_path / "e", StudySettings(remedies={"longer": {"lr_typo": 1.0}}), device="cpu")
    with pytest.raises(MlaconvertError, match="own_context = '0.5' should be a number"):
        study(world_model, tmp_path / "e", StudySettings(remedies={"own": {"own_context": "0.5"}}), device="cpu")
    with pytest.raises(MlaconvertError, match="rope_dim = 16.0 should be"):
        study(world_model, tmp_path / "e", StudySettings(remedies={"rope": {"rope_dim": 16.0}}), device="cpu")
    with pytest.raises(MlaconvertError, match="remedy 'rope': --rope-dim 26 is larger than the head dim 24"):
        study(world_model, tmp_path / "e", StudySettings(remedies={"rope": {"rope_dim": 26}}), device="cpu")
    with pytest.raises(MlaconvertError, match="same settings"):
        study(world_model, tmp_path / "e", StudySettings(remedies={"a": {"lr": 1e-3}, "b": {"lr": 1e-3}}), device="cpu")
    with pytest.raises(MlaconvertError, match="auto"):
        study(world_model, tmp_path / "b", StudySettings(dc=("auto",)), device="cpu")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "settings.json").write_text('{"model": "another"}')
    with pytest.raises(MlaconvertError, match="other settings"):
        study(world_model, tmp_path / "c", GRID, finetune=FINETUNE, evaluation=EVAL, device="cpu")
    with pytest.raises(MlaconvertError, match="already an MLA model"):
        study(str(finished[0] / "cells" / "svd-dc4" / "mla"), tmp_path / "d", GRID, device="cpu")
    assert not any((tmp_path / x).exists() for x in "ade")


RECIPE = """
[study]
dc = ["4", "8"]
init = ["svd"]
rope_dim = 8
max_steps = 2
headline_steps = 3
headline_cache = 0.4
[study.remedies."noisy context"]
context_noise = 0.2
max_steps = 2
[finetune]
batch = 1
clips = 3
held_out = 1
frames = 6
warmup = 1
checkpoint_every = 1
eval_every = 10
[eval]
clips = 2
frames = 6
batch = 2
edges = [6, 9]
agreement_clips = 1
strip_clips = 1
"""


def test_the_command_reads_the_recipe_carries_on_and_prints_the_table(cli, finished, tmp_path):
    out, result, _ = finished
    (tmp_path / "study.toml").write_text(f'source = "{result["model"]}"\n{RECIPE}')
    r = cli("study", "--recipe", str(tmp_path / "study.toml"), "-o", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert ": convert" not in r.stdout and "svd dc 8, 2 steps" in r.stdout and "headline" in r.stdout  # nothing redone
    r = cli("study", "--recipe", str(tmp_path / "study.toml"), "-o", str(out), "--max-steps", "3", "--device", "cpu")
    assert r.returncode == 1 and "other settings" in r.stderr and "Traceback" not in r.stderr
    r = cli("study", "--recipe", str(tmp_path / "study.toml"), "--init", "pca", "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "choose from" in r.stderr


def test_the_fine_tunes_long_horizon_check_judges_a_world_model_against_its_world(world_model, finished, tmp_path):
    from mlaconvert.evaluation.evaluate import evaluate, world_truth
    from mlaconvert.inference.sampling import SamplerSettings
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.modeling.model import load_model
    from mlaconvert.training.finetune import finetune
    from mlaconvert.training.training_run import derived_seed

    settings = dataclasses.replace(FINETUNE, max_steps=1, horizon_frames=9, horizon_clips=2)
    result = finetune(str(finished[0] / "cells" / "svd-dc8" / "mla"), tmp_path / "ft", settings, teacher=world_model,
                      device="cpu", show_progress=False)
    horizon = result.report["finetune"]["horizon"]
    # The reference: eval's own measure of the dense model on fresh clips of its world, seeded as the check is.
    dense = load_source(world_model)
    truth = world_truth(dense.config, EvalSettings(clips=2, seed=derived_seed(0, "horizon", 0)), 9)
    report = evaluate(load_model(dense.config, dense.state_dict), truth, prefix=3, sampler=SamplerSettings.for_model(dense.config),
                      settings=EvalSettings(clips=2, batch=2, seed=derived_seed(0, "horizon-noise", 0))).report
    assert horizon["teacher_psnr_db"] == pytest.approx([h["psnr_db"] for h in report["horizons"]], abs=1e-4)
    assert [c["step"] for c in horizon["checks"]] == [0, 1]
