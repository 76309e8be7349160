"""Prompt encoding against a tiny but real umT5 encoder and tokenizer, built offline in the layout of a
diffusers Wan repo (`text_encoder/` + `tokenizer/`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.text import (
    encode_prompts,
    load_prompt_embeds,
    random_prompt_embeds,
    save_prompt_embeds,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT_LEN = 16
D_MODEL = 32
PROMPTS = ["a red fox runs through fresh snow", "a cat", "waves crash on a rocky shore at sunset under pink clouds"]
CORPUS = PROMPTS + ["the quick brown fox jumps over the lazy dog", "snow falls on the quiet city at night"]


def write_tokenizer(folder: Path) -> None:
    """A T5-like tokenizer (pad 0, eos 1, unk 2; `</s>` appended to every sequence) trained on a few sentences
    and saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def encoder_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=64, d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    UMT5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def reference_embeds(repo: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder run by hand on the same tokens: (last hidden state, attention mask)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(repo / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(repo / "text_encoder").eval()
    tokens = tokenizer(prompts, max_length=TEXT_LEN, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden, tokens.attention_mask


def test_encode_matches_the_encoder_and_zeroes_the_padding(encoder_repo: Path):
    embeds = encode_prompts(PROMPTS, str(encoder_repo), device="cpu", text_len=TEXT_LEN)
    assert embeds.shape == (3, TEXT_LEN, D_MODEL) and embeds.dtype == torch.float32

    hidden, mask = reference_embeds(encoder_repo, PROMPTS)
    lengths = mask.sum(1).tolist()
    assert lengths == [8, 3, 12]  # words + </s>
    for i, n in enumerate(lengths):
        torch.testing.assert_close(embeds[i, :n], hidden[i, :n], rtol=0, atol=0)
        assert embeds[i, :n].abs().amin(dim=-1).gt(0).all()  # real tokens are never zeroed
        assert embeds[i, n:].eq(0).all()
    # The encoder itself does not output zeros there: the zeroing is Wan's own step.
    assert hidden[1, lengths[1] :].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_on_gpu_frees_the_encoder(encoder_repo: Path):
    # A first run allocates what stays for the process anyway (cuBLAS workspaces); the second is measured.
    encode_prompts(PROMPTS, str(encoder_repo), device="cuda", text_len=TEXT_LEN)
    before = torch.cuda.memory_allocated()
    embeds = encode_prompts(PROMPTS, str(encoder_repo), device="cuda", text_len=TEXT_LEN)
    assert embeds.device.type == "cuda" and embeds.dtype == torch.bfloat16
    # Only the embeddings stay on the GPU (the caching allocator rounds each tensor up to 512 bytes).
    assert torch.cuda.memory_allocated() - before <= -(-embeds.numel() * embeds.element_size() // 512) * 512
    reference = encode_prompts(PROMPTS, str(encoder_repo), device="cpu", text_len=TEXT_LEN)
    torch.testing.assert_close(embeds.float().cpu(), reference, rtol=0.05, atol=0.05)


def test_encode_truncates_and_cleans(encoder_repo: Path):
    long = " ".join(CORPUS)
    embeds = encode_prompts([long, "  a\n\tcat &amp;amp; "], str(encoder_repo), device="cpu", text_len=TEXT_LEN)
    assert embeds[0].abs().amin(dim=-1).gt(0).all()  # truncated: every position is a token
    # Whitespace collapsed and the doubly escaped '&' restored, as Wan cleans prompts: "a cat &" + </s>.
    hidden, _ = reference_embeds(encoder_repo, ["a cat &"])
    torch.testing.assert_close(embeds[1, :4], hidden[0, :4], rtol=0, atol=0)
    assert embeds[1, 4:].eq(0).all()


def test_encode_from_an_offline_hub_cache(encoder_repo: Path, hub_cache):
    hub_cache.add("org/wan-diffusers", encoder_repo)
    embeds = encode_prompts(["a cat"], "org/wan-diffusers", device="cpu", text_len=TEXT_LEN, dtype=torch.float64)
    assert embeds.dtype == torch.float64 and embeds.shape == (1, TEXT_LEN, D_MODEL)
    with pytest.raises(MlaconvertError, match=r"org/missing.*--prompt-embeds FILE.safetensors or --random-text"):
        encode_prompts(["a cat"], "org/missing", device="cpu")


def test_missing_encoder_or_tokenizer(encoder_repo: Path, tmp_path: Path):
    (tmp_path / "tokenizer").symlink_to(encoder_repo / "tokenizer")
    with pytest.raises(MlaconvertError, match=r"no umT5 text encoder .*--prompt-embeds FILE.safetensors or --random"):
        encode_prompts(["a cat"], str(tmp_path), device="cpu")
    (tmp_path / "text_encoder").symlink_to(encoder_repo / "text_encoder")
    (tmp_path / "tokenizer").unlink()
    with pytest.raises(MlaconvertError, match=r"no tokenizer .*--random-text"):
        encode_prompts(["a cat"], str(tmp_path), device="cpu")
    with pytest.raises(MlaconvertError, match="no prompts"):
        encode_prompts([], str(encoder_repo), device="cpu")


def test_save_load_round_trip(tmp_path: Path):
    embeds = torch.randn(2, 5, 8).to(torch.bfloat16)
    path = tmp_path / "embeds.safetensors"
    save_prompt_embeds(path, embeds, ["one", "two é"])
    loaded, prompts = load_prompt_embeds(path)
    assert prompts == ["one", "two é"] and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded, embeds)

    with pytest.raises(MlaconvertError, match="already exists"):
        save_prompt_embeds(path, embeds)
    save_prompt_embeds(path, embeds[:1], force=True)
    loaded, prompts = load_prompt_embeds(path)
    assert prompts is None and loaded.shape == (1, 5, 8)


def test_load_rejects_bad_files(tmp_path: Path):
    save_file({"context": torch.zeros(1, 4, 8)}, tmp_path / "wrong_key.safetensors")
    with pytest.raises(MlaconvertError, match="has no 'prompt_embeds' tensor \\(it has: context\\)"):
        load_prompt_embeds(tmp_path / "wrong_key.safetensors")
    save_file({"prompt_embeds": torch.zeros(4, 8)}, tmp_path / "flat.safetensors")
    with pytest.raises(MlaconvertError, match=r"must be \(batch, tokens, dim\), got shape \(4, 8\)"):
        load_prompt_embeds(tmp_path / "flat.safetensors")
    save_file({"prompt_embeds": torch.zeros(2, 4, 8)}, tmp_path / "meta.safetensors", metadata={"prompts": '["x"]'})
    with pytest.raises(MlaconvertError, match="not a list of 2 strings"):
        load_prompt_embeds(tmp_path / "meta.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MlaconvertError, match="not a readable safetensors file"):
        load_prompt_embeds(tmp_path / "junk.safetensors")
    with pytest.raises(MlaconvertError, match="no such prompt embeddings file"):
        load_prompt_embeds(tmp_path / "absent.safetensors")
    with pytest.raises(MlaconvertError, match="3 prompts for 1"):
        save_prompt_embeds(tmp_path / "out.safetensors", torch.zeros(1, 4, 8), ["a", "b", "c"])


def test_random_embeds_are_seeded():
    a = random_prompt_embeds(2, 512, 4096, seed=7)
    assert a.shape == (2, 512, 4096) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, random_prompt_embeds(2, 512, 4096, seed=7))
    assert not torch.equal(a, random_prompt_embeds(2, 512, 4096, seed=8))
    assert 0.14 < a.std().item() < 0.16
