"""Checkpoints larger than memory: the tensor-by-tensor safetensors writer against the safetensors library, the
lazy reader, random checkpoints laid out as the Hub's (read back by diffusers' own model), and a convert whose
peak memory stays well below the model it converts while its export equals the in-memory conversion bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mlaconvert.checkpoints.formats import _read_safetensors, read_checkpoint
from mlaconvert.checkpoints.hub import load_source
from mlaconvert.checkpoints.naming import native_to_diffusers
from mlaconvert.checkpoints.streaming import LazyStateDict, Overlaid, tensor_spec, total_numel, write_safetensors
from mlaconvert.checkpoints.synthetic import write_random_checkpoint
from mlaconvert.conversion.convert import ConvertSettings, convert_model
from mlaconvert.conversion.export import save_weights
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig


def test_a_file_written_tensor_by_tensor_is_what_the_safetensors_library_reads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a": torch.randn(7, generator=g),
               "h": torch.randn(2, 2, generator=g).half(), "i": torch.arange(5), "scalar": torch.tensor(2.5, dtype=torch.float64),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    made = []
    write_safetensors(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                      lambda k: made.append(k) or tensors[k], metadata={"format": "pt", "note": "hi"})
    assert made == list(tensors)  # each made once, in order
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    with pytest.raises(ValueError, match="announced"):
        write_safetensors(tmp_path / "y.safetensors", [("a", torch.float32, (3,))], lambda k: torch.zeros(4))


def test_the_lazy_state_dict_knows_shapes_unread_and_reads_what_is_looked_up(tmp_path: Path, tiny_config: WanConfig) -> None:
    folder = write_random_checkpoint(tiny_config, tmp_path / "wan", shard_bytes=100_000, dtype=torch.float32)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    lazy = LazyStateDict.of_files({k: folder / v for k, v in index.items()})
    eager = _read_safetensors({k: folder / v for k, v in index.items()})
    assert set(lazy) == set(eager) and total_numel(lazy) == sum(t.numel() for t in eager.values())
    for key, tensor in eager.items():
        assert tensor_spec(lazy, key) == (tensor.dtype, tuple(tensor.shape)) and torch.equal(lazy[key], tensor)
    assert "head.head.weight" in lazy and "nothing" not in lazy
    renamed = lazy.renamed({"head.head.weight": "out.weight"})
    assert list(renamed) == ["out.weight"] and torch.equal(renamed["out.weight"], eager["head.head.weight"])
    # A converted state dict keeps the untouched tensors where they are, and drops what it replaces.
    view = Overlaid(lazy, lambda k: ".self_attn." in k, {"extra": torch.ones(2)})
    assert "extra" in view and not any(".self_attn." in k for k in view) and len(view) == len(list(view))
    with pytest.raises(KeyError):
        view["blocks.0.self_attn.q.weight"]
    # Written through the streaming writer in shards, it reads back through every reader.
    (tmp_path / "out").mkdir()
    save_weights(view, tmp_path / "out", shard_bytes=150_000)
    shards = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1 and set(shards) == set(view)
    by_library = {k: v for name in set(shards.values()) for k, v in load_file(tmp_path / "out" / name).items()}
    ours = _read_safetensors({k: tmp_path / "out" / v for k, v in shards.items()})
    for key in view:
        assert torch.equal(by_library[key], view[key]) and torch.equal(ours[key], view[key])


def test_a_random_checkpoint_is_laid_out_as_the_hubs(tmp_path: Path, tiny_config: WanConfig) -> None:
    from diffusers import WanTransformer3DModel

    wan = write_random_checkpoint(tiny_config, tmp_path / "wan", shard_bytes=150_000)
    hub = write_random_checkpoint(tiny_config, tmp_path / "diffusers", layout="diffusers", shard_bytes=10**9)
    native = load_source(str(wan))
    assert native.config == tiny_config and native.format == "wan" and native.info["dtypes"] == ["bfloat16"]
    # diffusers' own model reads the diffusers layout, and its tensors are the native ones under diffusers names.
    # (from_pretrained itself needs accelerate for Wan; its config and a strict load check the same.)
    model = WanTransformer3DModel.from_config(json.loads((hub / "transformer" / "config.json").read_text()))
    files = sorted((hub / "transformer").glob("*.safetensors"))
    model.load_state_dict({k: v for f in files for k, v in load_file(f).items()}, strict=True)
    theirs, ours = model.state_dict(), native_to_diffusers(native.state_dict)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k].float()) for k in ours)
    assert load_source(str(hub), lazy=True).format == "diffusers"
    with pytest.raises(MlaconvertError, match="--force"):
        write_random_checkpoint(tiny_config, tmp_path / "wan")


BIG = WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=12, text_dim=64, freq_dim=64)  # 0.21 GB in float32
CONVERT = ("import resource, sys; from mlaconvert.cli import main; sys.argv = ['mlaconvert', 'convert', sys.argv[1], '--dc', '64', "
           "'--rope-dim', '32', '--no-measure', '--device', 'cpu', '-o', sys.argv[2]]\n"
           "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def _convert_peak(source: Path, output: Path) -> tuple[int, int]:
    """(peak resident bytes of a `convert` process, bytes of the checkpoint it converted)."""
    run = subprocess.run([sys.executable, "-c", CONVERT, str(source), str(output)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1]) * 1024, sum(p.stat().st_size for p in source.glob("*.safetensors"))  # ru_maxrss: KiB


def test_convert_memory_does_not_grow_with_the_model_and_its_export_is_what_memory_would_make(tmp_path: Path) -> None:
    source = write_random_checkpoint(BIG, tmp_path / "big", dtype=torch.float32, shard_bytes=200_000_000)
    small = write_random_checkpoint(BIG.replace(num_layers=2), tmp_path / "small", dtype=torch.float32)
    # What the imports, the report's plot and one layer's work cost is the same for both; six times the layers
    # (0.16 GiB more to read and write) may add a fifth of that at most (measured: nothing), where a conversion
    # in memory adds all of it and more (a 2.8 GB Wan-1.3B took 3.4 GB before streaming).
    (peak, size), (small_peak, small_size) = _convert_peak(source, tmp_path / "mla"), _convert_peak(small, tmp_path / "small-mla")
    assert peak - small_peak < (size - small_size) / 5, f"{(peak - small_peak) / 2**20:.0f} MiB more for {(size - small_size) / 2**20:.0f} MiB more model"
    # The reference: the same conversion from the checkpoint read whole into memory (of the small one: the same code).
    conversion = convert_model(read_checkpoint(small), ConvertSettings(dc=64, rope_dim=32, measure=False))
    exported = load_file(tmp_path / "small-mla" / "model.safetensors")
    assert exported.keys() == set(conversion.state_dict)
    assert all(torch.equal(exported[k], conversion.state_dict[k]) for k in exported)


def test_a_killed_converts_spilled_factors_are_swept_by_the_next(tmp_path: Path) -> None:
    from mlaconvert.conversion.convert import convert_source

    stale = tmp_path / ".mla.factors-killed"
    stale.mkdir()
    (stale / "layer-00000.safetensors").write_bytes(b"left by a SIGKILL")
    convert_source("builtin:tiny-wan", tmp_path / "mla", ConvertSettings(dc=16, rope_dim=16, measure=False))
    assert (tmp_path / "mla" / "config.json").is_file()
    assert not list(tmp_path.glob(".mla.factors-*"))  # neither the stale folder nor this run's spill is left
