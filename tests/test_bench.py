"""The benchmark's code path on the CPU with the tiny architecture (the numbers that matter need a GPU)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from mlaconvert.checkpoints.builtin import TINY_WAN
from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.bench import BenchSettings, mla_variant, print_bench, run_bench, write_bench


def test_bench_runs_both_variants_through_the_same_sampler(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mlaconvert.progress.PLAIN_EVERY_S", 0.0)  # piped (pytest captures): a line per rollout
    settings = BenchSettings(preset="tiny", height=64, width=48, windows=(6,), chunks=(2,), batches=(1,), dc=32,
                             rope_dim=16, timed_chunks=1, long_seconds=2)
    report = run_bench(settings, device="cpu")
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["dense"]["cached_values_per_token"] == 2 * TINY_WAN.dim and rows["mla"]["cached_values_per_token"] == 48
    assert report["ratios"]["w6/c2/b1"]["cache"] == pytest.approx(48 / 384)
    assert set(report["long_rollout"]) >= {"dense", "mla"}
    # The fastest dense path caches its keys rotated; the latent cache keeps its rope key unrotated.
    assert report["paths"]["dense"]["keys_cached_rotated"] and not report["paths"]["mla"]["keys_cached_rotated"]
    # Time to the first chunk: the first chunk of each variant's first rollout (its warm-up when compiling).
    for variant, path in report["paths"].items():
        assert path["time_to_first_chunk_s"] == report["rows"][[r["variant"] for r in report["rows"]].index(variant)]["first_chunk_s"] > 0
    assert "bench 6/6" in capsys.readouterr().err  # 2 variants x (batches 1, 2 + the long rollout)
    json_path, png_path = write_bench(report, tmp_path)
    assert json.loads(json_path.read_text())["schema"] == "mlaconvert.bench/1"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_streams_every_chunk_to_pixels_and_gives_the_end_to_end_rate(monkeypatch):
    pytest.importorskip("diffusers")
    from mlaconvert.inference.video import StreamingDecoder

    frames_out = []
    decode = StreamingDecoder.decode

    def counted(self, x0):
        pixels = decode(self, x0)
        frames_out.append(pixels.shape[2])
        return pixels

    monkeypatch.setattr(StreamingDecoder, "decode", counted)
    settings = BenchSettings(preset="tiny", height=64, width=48, windows=(4,), chunks=(2,), batches=(1, 2), dc=32,
                             rope_dim=16, timed_chunks=2, long_seconds=1, decode=True)
    report = run_bench(settings, device="cpu")
    # Per batch-1 rollout of each variant (none at batch 2, whose VAE time is twice one stream's, and none for the
    # long one, which measures the DiT's memory alone):
    # 1 + 4 (f - 1) pixel frames from the first chunk, as Wan's causal VAE makes them, then 4 f from each later one:
    # the decoder restarts each video.
    assert frames_out == [5, 8, 8, 8] * 2
    one = [row for row in report["rows"] if row["batch"] == 1]
    for row in one:
        assert row["decode_latency_s"] > 0
        assert row["fps_end_to_end"] == pytest.approx(2 * 4 / (row["chunk_latency_s"] + row["decode_latency_s"]))
    assert not any("decode_latency_s" in row for row in report["rows"] if row["batch"] == 2)
    dense, mla = one
    assert report["ratios"]["w4/c2/b1"]["throughput_end_to_end"] == pytest.approx(mla["fps_end_to_end"] / dense["fps_end_to_end"])
    text = io.StringIO()
    print_bench(report, Console(file=text, width=200))
    assert "fps with decode" in text.getvalue()


def test_a_batch_out_of_memory_is_a_row_of_its_own_and_the_rest_still_runs(tmp_path, monkeypatch):
    import torch

    from mlaconvert.inference import bench

    measure = bench._measure

    def dense_runs_out_at_two(model, batch, *args, **options):
        if batch == 2 and not model.config.is_mla:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return measure(model, batch, *args, **options)

    monkeypatch.setattr(bench, "_measure", dense_runs_out_at_two)
    settings = BenchSettings(preset="tiny", height=64, width=48, windows=(6,), chunks=(2,), batches=(1, 2), dc=32,
                             rope_dim=16, timed_chunks=1, long_seconds=0)
    report = run_bench(settings, device="cpu")
    assert [(r["variant"], r["batch"], r.get("oom", False)) for r in report["rows"]] == [
        ("dense", 1, False), ("dense", 2, True), ("mla", 1, False), ("mla", 2, False)]
    _, png_path = write_bench(report, tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streams_never_go_negative_and_a_dense_model_that_fits_none_gives_no_ratio():
    from mlaconvert.inference.bench import _ratios, _streams_in_budget

    dense = _streams_in_budget({1: 50.0, 2: 60.0}, budget_gib=30.0, card_gib=80.0)
    mla = _streams_in_budget({1: 20.0, 2: 22.0}, budget_gib=30.0, card_gib=80.0)
    assert (dense["max_streams"], dense["max_streams_card"]) == (0, 4)  # 40 GiB fixed, 10 per stream
    assert (mla["max_streams"], mla["max_streams_card"]) == (6, 31)  # 18 GiB fixed, 2 per stream
    ratios = _ratios({"rows": [], "streams_in_budget": {"dense/w1/c1": dense, "mla/w1/c1": mla}})
    assert "streams/w1/c1" not in ratios


def test_mla_variant_uses_wans_leading_pairs_per_axis():
    config = mla_variant(TINY_WAN, 32, 16)
    assert config.mla.rope_pairs[0] == ((0, 1, 2, 3), (12, 13), (22, 23))  # head_dim 64: 12 frame, 10 row, 10 column pairs


def test_bench_without_cuda_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(MlaconvertError, match="no CUDA device found; pass --device cpu"):
        run_bench(BenchSettings(), device="cuda")
    with pytest.raises(MlaconvertError, match=r"\d\.\dB-parameter model on the CPU would take hours; pass --device cpu"):
        run_bench(BenchSettings())  # the default device policy never lands a full-size model on the CPU


def test_kernels_and_operators_are_sorted_into_attention_matmul_and_the_rest():
    from mlaconvert.inference.profile import kind_of

    # Kernel names from the committed H200 profile, and the CPU operators that stand for them.
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kind_of("nvjet_sm90_tst_192x144_64x5_2x1_v_bz_coopB_bias_TNT") == "matmul"
    assert kind_of("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl>") == "other"
    assert kind_of("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>") == "other"
    assert [kind_of(op) for op in ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mul")] == [
        "matmul", "attention", "other"]
    # Compiled blocks: Inductor names fused elementwise kernels after the operators around them.
    assert kind_of("triton_poi_fused_addmm_gelu_3") == "other" and kind_of("triton_tem_fused_mm_0") == "matmul"
    assert kind_of("triton_poi_fused__scaled_dot_product_flash_attention_cat_7") == "other"


def test_profile_splits_one_steady_forward_and_sets_its_floor_by_its_flops(tmp_path):
    settings = BenchSettings(preset="tiny", height=64, width=48, windows=(6,), chunks=(2,), batches=(1,), dc=32,
                             rope_dim=16, timed_chunks=1, long_seconds=0, profile=True)
    report = run_bench(settings, device="cpu")
    assert set(report["profile"]) == {"dense", "mla"}
    for p in report["profile"].values():
        kernel, flops, rates = p["kernel_ms"], p["flops"], p["rates_tflops"]
        assert kernel["total"] == pytest.approx(kernel["attention"] + kernel["matmul"] + kernel["other"])
        assert kernel["matmul"] > 0 and flops["matmul"] > 0 and p["wall_ms"] > 0
        top = p["top_kernels"]
        assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True) and len(top) <= 15
        assert any(k["kind"] == "matmul" and k["calls"] > 0 for k in top)  # the projections are among the costliest
        floor = (flops["matmul"] / rates["matmul"] + flops["attention"] / rates["attention"]) / 1e12 * 1e3
        assert p["floor_ms"] == pytest.approx(floor)
    text = io.StringIO()
    print_bench(report, Console(file=text, width=200))
    assert f"{report['profile']['mla']['top_kernels'][0]['ms']:7.2f} ms" in text.getvalue()


def test_a_bench_cut_short_resumes_without_measuring_again(cli, tmp_path, monkeypatch):
    import mlaconvert.inference.bench as bench

    measure, calls, cut = bench._measure, [], {"at": 3}

    def counted(model, batch, frames, *args):
        calls.append((model.config.is_mla, batch, frames))
        if len(calls) == cut["at"]:
            raise KeyboardInterrupt  # Ctrl-C, a time limit or a lost machine, in the first run's third rollout
        return measure(model, batch, frames, *args)

    monkeypatch.setattr(bench, "_measure", counted)
    out = tmp_path / "b"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "32", "--window", "3",
            "--batch", "1", "--timed-chunks", "1", "--long-seconds", "1", "-o", str(out)]
    r = cli(*args)
    cut["at"] = None
    assert r.returncode == 130 and "keeps what it measured; continue with: mlaconvert bench" in r.stderr and "--resume" in r.stderr
    journal = [json.loads(line) for line in (out / "bench-cpu.measurements.jsonl").read_text().splitlines()]
    assert journal[0]["windows"] == [3] and [entry["key"] for entry in journal[1:]] == ["dense timed w3 c3 b1 f6", "dense timed w3 c3 b2 f6"]
    # Half a line, as a process killed while writing leaves it: dropped, not read.
    with (out / "bench-cpu.measurements.jsonl").open("a") as f:
        f.write('{"key": "dense long w3 c3 b1 f')
    r = cli(*args, "--window", "4", "--resume")
    assert r.returncode == 1 and "measured with other settings (windows differ); start over with --force" in r.stderr
    r = cli(*args, "--graphs", "--resume")  # another report, so another journal: this folder holds the first one only
    assert r.returncode == 1 and "holds bench-cpu.measurements.jsonl: resume with the settings" in r.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "bench-cpu.measurements.jsonl").write_text("not json\n")
    r = cli(*args[:-1], str(damaged), "--resume")
    assert r.returncode == 1 and r.stderr.strip().endswith("is not a bench journal; start over with --force")
    calls.clear()
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    # The two rollouts written down are kept; the dense long rollout and both of MLA's are measured now.
    long = bench.latent_frames_for(1)
    assert calls == [(False, 1, long), (True, 1, 6), (True, 2, 6), (True, 1, long)]
    report = json.loads((out / "bench-cpu.json").read_text())
    assert report["resumed"] and report["rows"][0] == journal[1]["value"] | {"variant": "dense"}
    assert sorted(p.name for p in out.iterdir()) == ["bench-cpu.json", "bench-cpu.png"]  # the journal went with the report
    r = cli(*args, "--resume")
    assert r.returncode == 1 and "nothing to resume: no 'bench-cpu.measurements.jsonl'" in r.stderr


def test_a_compiled_bench_compiles_each_shape_in_a_rollout_it_does_not_measure(cli, tmp_path, monkeypatch):
    """Compiling takes time and memory: no measured rollout may pay for it, in a resumed process either."""
    import mlaconvert.inference.bench as bench
    from mlaconvert.modeling.model import WanModel

    monkeypatch.setattr(WanModel, "compile_blocks", lambda self: None)  # the CPU test checks the schedule, not Inductor
    measure, calls, cut = bench._measure, [], {"at": 4}

    def counted(model, batch, frames, *args):
        calls.append((model.config.is_mla, batch, frames))
        if len(calls) == cut["at"]:
            raise KeyboardInterrupt
        return measure(model, batch, frames, *args)

    monkeypatch.setattr(bench, "_measure", counted)
    out = tmp_path / "b"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "32", "--window", "3",
            "--batch", "1", "--timed-chunks", "2", "--long-seconds", "1", "--compile", "-o", str(out)]
    assert cli(*args).returncode == 130
    warm, timed, long = 6, 9, bench.latent_frames_for(1)
    assert calls == [(False, 1, warm), (False, 1, timed), (False, 2, warm), (False, 2, timed)]
    calls.clear()
    cut["at"] = None
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    # Batch 1 was measured by the first process; this one compiles batch 1 again before the long rollout.
    assert calls == [(False, 2, warm), (False, 2, timed), (False, 1, warm), (False, 1, long),
                     (True, 1, warm), (True, 1, timed), (True, 2, warm), (True, 2, timed), (True, 1, long)]
    report = json.loads((out / "bench-cpu-compiled.json").read_text())
    rows = [row for row in report["rows"] if row["variant"] == "dense"]
    assert report["paths"]["dense"]["time_to_first_chunk_s"] == rows[0]["warm_up_first_chunk_s"] > 0
