"""Every checkpoint layout reads to the same canonical weights and config, and bad inputs say what is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mlaconvert.checkpoints.builtin import TINY_WAN, builtin_path, make_tiny_wan
from mlaconvert.checkpoints.formats import (
    config_from_dict,
    diffusers_config_to_wan,
    infer_config,
    read_checkpoint,
    save_native,
)
from mlaconvert.checkpoints.naming import (
    diffusers_to_native,
    native_shapes,
    native_to_diffusers,
    strip_wrappers,
)
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import PRESETS, MLAConfig

# Verbatim config.json files of the official releases (Wan-AI/Wan2.1-T2V-1.3B and its -Diffusers twin).
OFFICIAL_NATIVE_1_3B = """{
  "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
  "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
  "text_len": 512
}"""
OFFICIAL_DIFFUSERS_1_3B = """{
  "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": null,
  "attention_head_dim": 128, "cross_attn_norm": true, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
  "image_dim": null, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
  "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096
}"""


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# --- names and shapes -----------------------------------------------------------------------------------


def test_native_shapes_match_a_real_diffusers_model_through_the_key_map(tiny_config, diffusers_model):
    diffusers_sd = diffusers_model.state_dict()
    native = diffusers_to_native(diffusers_sd)
    assert {k: tuple(v.shape) for k, v in native.items()} == native_shapes(tiny_config)
    # A bijection: every key maps, distinct keys stay distinct, and the inverse restores every name.
    assert len(native) == len(diffusers_sd)
    assert list(native_to_diffusers(native)) == list(diffusers_sd)


def test_native_shapes_of_wan_1_3b_count_its_1_42b_parameters():
    shapes = native_shapes(PRESETS["wan2.1-1.3b"])
    assert sum(math.prod(s) for s in shapes.values()) == 1_418_996_800
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536)
    assert shapes["head.head.weight"] == (64, 1536)


def test_native_shapes_drop_optional_norms():
    cfg = TINY_WAN.replace(qk_norm=False, cross_attn_norm=False)
    assert not [k for k in native_shapes(cfg) if "norm" in k]


def test_strip_wrappers_removes_every_wrapper_component_and_nothing_else():
    key = "module.model._orig_mod.blocks.3._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.norm_q.weight"
    assert strip_wrappers(key) == "blocks.3.self_attn.norm_q.weight"
    assert strip_wrappers("head.modulation") == "head.modulation"


# --- configs --------------------------------------------------------------------------------------------


def test_official_configs_read_as_the_1_3b_preset():
    assert config_from_dict(json.loads(OFFICIAL_NATIVE_1_3B)) == PRESETS["wan2.1-1.3b"]
    assert config_from_dict(json.loads(OFFICIAL_DIFFUSERS_1_3B)) == PRESETS["wan2.1-1.3b"]


def test_diffusers_config_round_trips(tiny_config, diffusers_model):
    assert diffusers_config_to_wan(dict(diffusers_model.config)) == tiny_config


def test_image_to_video_models_are_refused():
    d = json.loads(OFFICIAL_DIFFUSERS_1_3B) | {"image_dim": 1280, "added_kv_proj_dim": 5120, "in_channels": 36}
    with pytest.raises(MlaconvertError, match="image-to-video"):
        config_from_dict(d)
    with pytest.raises(MlaconvertError, match="i2v"):
        config_from_dict(json.loads(OFFICIAL_NATIVE_1_3B) | {"model_type": "i2v"})


def test_infer_config_recovers_every_field_from_shapes(tiny_config, tiny_state_dict):
    assert infer_config(tiny_state_dict, head_dim=tiny_config.head_dim) == tiny_config
    no_norms = tiny_config.replace(qk_norm=False, cross_attn_norm=False)
    assert infer_config(make_tiny_wan(0, no_norms), head_dim=24) == no_norms


def test_infer_config_refuses_a_head_dim_that_does_not_divide(tiny_state_dict):
    with pytest.raises(MlaconvertError, match="dim 48 is not divisible by head_dim 128"):
        infer_config(tiny_state_dict)


# --- every layout reads to the same weights -------------------------------------------------------------

LAYOUTS = {
    "native": lambda w: w.native(),
    "native-sharded": lambda w: w.native(shards=3),
    "diffusers-root": lambda w: w.diffusers(),
    "diffusers-transformer-folder": lambda w: w.diffusers() / "transformer",
    "diffusers-single-file": lambda w: w.diffusers(max_shard_size="10GB") / "transformer",
    "safetensors-native": lambda w: w.safetensors_file(naming="native"),
    "safetensors-diffusers": lambda w: w.safetensors_file(naming="diffusers"),
    "training-pt": lambda w: w.training_pt(),
    "training-pt-diffusers-names": lambda w: w.training_pt(naming="diffusers"),
}
EXPECTED_FORMAT = {
    "native": "wan",
    "native-sharded": "wan",
    "diffusers-root": "diffusers",
    "diffusers-transformer-folder": "diffusers",
    "diffusers-single-file": "diffusers",
    "safetensors-native": "wan",
    "safetensors-diffusers": "diffusers",
    "training-pt": "training",
    "training-pt-diffusers-names": "training",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_to_the_same_weights_and_config(layout, checkpoints, tiny_config, tiny_state_dict):
    path = LAYOUTS[layout](checkpoints)
    # Lone files carry no config: it comes from the tensor shapes, with the head width as the one hint.
    ckpt = read_checkpoint(path, head_dim=tiny_config.head_dim)
    assert ckpt.format == EXPECTED_FORMAT[layout]
    assert ckpt.config == tiny_config
    assert_same_weights(ckpt.state_dict, tiny_state_dict)
    assert all(f.exists() for f in ckpt.files)


def test_diffusers_folder_really_is_sharded_by_diffusers(checkpoints):
    transformer = checkpoints.diffusers() / "transformer"
    index = json.loads((transformer / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("diffusion_pytorch_model-00001-of-")
    ckpt = read_checkpoint(transformer.parent)
    assert [f.name for f in ckpt.files] == shards
    assert ckpt.info["config_file"] == str(transformer / "config.json")


def test_training_checkpoint_prefers_generator_ema(checkpoints, tiny_config, tiny_state_dict):
    ckpt = read_checkpoint(checkpoints.training_pt(), config=tiny_config)
    assert ckpt.info["state_key"] == "generator_ema"
    assert_same_weights(ckpt.state_dict, tiny_state_dict)  # generator holds weights + 1


@pytest.mark.parametrize("wrap", ["model", "state_dict", None])
def test_training_checkpoint_other_containers(wrap, tmp_path, tiny_config, tiny_state_dict):
    sd = {f"module._orig_mod.{k}": v for k, v in tiny_state_dict.items()}
    torch.save({wrap: sd, "epoch": 3} if wrap else sd, tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(tmp_path / "ckpt.pt", head_dim=24)
    assert ckpt.info["state_key"] == wrap
    assert ckpt.config == tiny_config
    assert_same_weights(ckpt.state_dict, tiny_state_dict)


def test_config_argument_accepts_a_preset_a_file_and_a_folder(checkpoints, tiny_config):
    pt = checkpoints.training_pt()
    folder = checkpoints.native()
    assert read_checkpoint(pt, config=folder / "config.json").config == tiny_config
    assert read_checkpoint(pt, config=str(folder)).config == tiny_config
    with pytest.raises(MlaconvertError, match=r"does not match its config \(dim 1536"):
        read_checkpoint(pt, config="wan2.1-1.3b")
    with pytest.raises(MlaconvertError, match="neither a preset"):
        read_checkpoint(pt, config="wan9")


def test_single_file_uses_a_sibling_wan_config_but_not_a_foreign_one(checkpoints, tiny_config):
    path = checkpoints.safetensors_file("model/weights.safetensors")
    (path.parent / "config.json").write_text(json.dumps(tiny_config.replace(text_len=77).to_dict()))
    assert read_checkpoint(path).config.text_len == 77
    (path.parent / "config.json").write_text(json.dumps({"_class_name": "UMT5EncoderModel", "d_model": 4096}))
    assert read_checkpoint(path, head_dim=24).config == tiny_config


def test_mlaconvert_export_is_read_with_its_mla_block(checkpoints, tiny_config, tiny_state_dict):
    mla = MLAConfig(dc=(16, 16), rope_dim=8, nope_dim=16)
    cfg = tiny_config.replace(mla=mla)
    sd = {k: v for k, v in tiny_state_dict.items() if not any(f"self_attn.{p}." in k for p in "kv")}
    for i in range(cfg.num_layers):
        sd[f"blocks.{i}.self_attn.kv_down.weight"] = torch.randn(16, cfg.dim)
        sd[f"blocks.{i}.self_attn.k_up.weight"] = torch.randn(cfg.num_heads * 16, 16)
    ckpt = read_checkpoint(checkpoints.export("mla", cfg, sd, shards=2))
    assert ckpt.format == "mlaconvert" and ckpt.config == cfg
    assert_same_weights(ckpt.state_dict, sd)

    del sd["blocks.1.self_attn.kv_down.weight"]
    with pytest.raises(MlaconvertError, match="missing blocks.1.self_attn.kv_down.weight"):
        read_checkpoint(checkpoints.export("broken", cfg, sd))


def test_tensors_keep_their_stored_dtype(make_checkpoints, tiny_config, tiny_state_dict):
    bf16 = {k: v.to(torch.bfloat16) for k, v in tiny_state_dict.items()}
    path = make_checkpoints(tiny_config, bf16).native("bf16")
    ckpt = read_checkpoint(path)
    assert ckpt.info["dtypes"] == ["bfloat16"]
    assert_same_weights(ckpt.state_dict, bf16)


def test_save_native_round_trips(tmp_path, tiny_config, tiny_state_dict):
    folder = save_native(tiny_config, tiny_state_dict, tmp_path / "out", extra_config={"note": "x"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ckpt = read_checkpoint(folder)
    assert ckpt.config == tiny_config and ckpt.format == "wan"
    assert_same_weights(ckpt.state_dict, tiny_state_dict)


def test_shipped_tiny_wan_is_make_tiny_wan_0_bit_for_bit():
    ckpt = read_checkpoint(builtin_path("tiny-wan"))
    assert ckpt.config == TINY_WAN
    assert_same_weights(ckpt.state_dict, make_tiny_wan(0))
    note = json.loads((builtin_path("tiny-wan") / "config.json").read_text())["mlaconvert_note"]
    assert "random weights" in note


def test_tiny_wan_is_initialised_at_a_sensible_scale():
    sd = make_tiny_wan(0)
    assert sd["blocks.0.ffn.0.weight"].std().item() == pytest.approx(192**-0.5, rel=0.05)
    assert sd["blocks.0.self_attn.norm_q.weight"].mean().item() == pytest.approx(1.0, abs=0.05)
    assert sd["blocks.0.modulation"].std().item() == pytest.approx(192**-0.5, rel=0.15)
    assert sd["head.head.bias"].abs().max().item() < 0.1
    assert not torch.equal(make_tiny_wan(1)["head.head.weight"], sd["head.head.weight"])


# --- bad inputs -----------------------------------------------------------------------------------------


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_safetensors_of_another_model_lists_expected_and_found_keys(tmp_path):
    path = tmp_path / "x.safetensors"
    keys = ["lm_head.weight", "model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(121))]
    save_file({k: torch.zeros(2) for k in keys}, path)
    with pytest.raises(MlaconvertError) as e:
        read_checkpoint(path)
    assert one_line(e) == (
        "'x.safetensors' is not a Wan DiT checkpoint: expected keys like patch_embedding.weight, "
        "blocks.0.self_attn.q.weight, head.head.weight; found lm_head.weight, model.embed_tokens.weight, "
        "model.layers.0.mlp.up_proj.weight, ... (123 keys)"
    )


def test_missing_and_misshapen_tensors_are_named(checkpoints, tiny_config, tiny_state_dict, tmp_path):
    sd = dict(tiny_state_dict)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.ffn.0.weight"] = torch.zeros(7, 48)
    sd["img_emb.proj.0.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(MlaconvertError) as e:
        read_checkpoint(tmp_path / "bad.safetensors", config=tiny_config)
    assert one_line(e).endswith(
        "missing blocks.1.ffn.2.bias; unexpected img_emb.proj.0.weight; "
        "wrong shape: blocks.0.ffn.0.weight is (7, 48), expected (96, 48)"
    )


@pytest.mark.parametrize("cut", [5, 200, -100])
def test_truncated_safetensors(checkpoints, cut):
    path = checkpoints.safetensors_file()
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(MlaconvertError) as e:
        read_checkpoint(path)
    assert "is truncated or not a safetensors" in one_line(e)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_pt(checkpoints, damage):
    path = checkpoints.training_pt()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x02garbage" * 64)
    with pytest.raises(MlaconvertError) as e:
        read_checkpoint(path)
    assert f"could not read '{path}': file is truncated or not a PyTorch checkpoint" == one_line(e)


class Optimizer:  # stands in for any pickled training object (optimizer, argparse.Namespace, OmegaConf, ...)
    pass


def test_pt_holding_python_objects_is_refused_without_unpickling(tmp_path, tiny_state_dict):
    path = tmp_path / "ckpt.pt"
    torch.save({"generator_ema": tiny_state_dict, "optimizer": Optimizer()}, path)
    with pytest.raises(MlaconvertError) as e:
        read_checkpoint(path)
    message = one_line(e)
    assert "weights_only loading refused it" in message and "Optimizer" in message


def test_pt_without_tensors(tmp_path):
    torch.save({"step": 3, "lr": 1e-4}, tmp_path / "ckpt.pt")
    with pytest.raises(MlaconvertError, match="holds no state dict.*found lr, step"):
        read_checkpoint(tmp_path / "ckpt.pt")


def test_unknown_file_type_and_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(MlaconvertError, match="not a safetensors or PyTorch checkpoint"):
        read_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(MlaconvertError, match=r"no Wan checkpoint in folder .*found notes.txt"):
        read_checkpoint(tmp_path)


def test_sharded_index_with_a_missing_shard(checkpoints):
    folder = checkpoints.native(shards=3)
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MlaconvertError, match="missing: diffusion_pytorch_model-00002-of-00003.safetensors"):
        read_checkpoint(folder)


def test_pt_without_config_and_non_dividing_head_dim(checkpoints):
    with pytest.raises(MlaconvertError, match="dim 48 is not divisible by head_dim 128"):
        read_checkpoint(checkpoints.training_pt())
