"""The offline CLIP tokenizer equals Stable Diffusion's, and prompts become ids/embeddings in one place."""

import importlib.util
import json
import logging

import pytest
import torch
from transformers import CLIPTokenizer

from latentdiff import tokenizer as tokenizer_module
from latentdiff.text import embed_prompts, encode_prompts, tokenize_prompts, too_long
from latentdiff.tokenizer import build_clip_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # SD-1.5's tokenizer on "a photo of a cat"


def test_matches_stable_diffusion_tokenizer(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer("a photo of a cat").input_ids == CAT_IDS
    # SD-1.5's special tokens: pad = unk = eos = <|endoftext|> (49407), bos = <|startoftext|> (49406)
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    assert clip_tokenizer.model_max_length == 77
    # lower-casing and punctuation, as in CLIP
    assert clip_tokenizer("A Photo, of a CAT!").input_ids == [49406, 320, 1125, 267, 539, 320, 2368, 256, 49407]


def test_tokenize_prompts_pads_truncates_and_warns_once(clip_tokenizer, caplog):
    long_prompt = " ".join(["cat"] * 100)
    with caplog.at_level(logging.WARNING):
        ids = tokenize_prompts(clip_tokenizer, ["a photo of a cat", long_prompt, long_prompt])
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    assert ids[0].tolist() == CAT_IDS + [49407] * 70
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == ids[1, 1]).all()
    warnings = [r.getMessage() for r in caplog.records if "longer than 77 tokens" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 prompts")


def test_a_prompt_of_exactly_the_max_length_is_not_cut(clip_tokenizer, caplog):
    fits = " ".join(["cat"] * 75)  # with BOS and EOS: 77 tokens
    assert too_long(clip_tokenizer, [fits, fits + " cat"]) == [1]
    with caplog.at_level(logging.WARNING):
        ids = tokenize_prompts(clip_tokenizer, [fits])
    assert "were cut" not in caplog.text
    assert ids[0].tolist() == [49406] + [2368] * 75 + [49407]  # nothing lost: every "cat" (2368) and the EOS


def test_tokenize_prompts_rejects_a_bare_string(clip_tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        tokenize_prompts(clip_tokenizer, "a photo of a cat")


def test_saved_folder_loads_with_tokenizer_json_or_vocab_files_alone(tmp_path):
    build_clip_tokenizer(tmp_path / "full", model_max_length=64)
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= files
    # transformers 4's CLIPTokenizer reads only vocab.json + merges.txt: check those alone rebuild the same ids
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (legacy / name).write_bytes((tmp_path / "full" / name).read_bytes())
    assert len(json.loads((legacy / "vocab.json").read_text())) == 49408
    for folder in ("full", "legacy"):
        loaded = CLIPTokenizer.from_pretrained(tmp_path / folder)
        assert loaded("a photo of a cat, café 🐱").input_ids[:7] == CAT_IDS[:6] + [267]
        assert loaded.model_max_length == 64 and loaded.pad_token == "<|endoftext|>"


def test_rebuilding_into_a_folder_replaces_the_tokenizer_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "tokenizer"
    build_clip_tokenizer(folder, model_max_length=64)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(tokenizer, staging):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer_module, "save_vocab_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_clip_tokenizer(folder, model_max_length=77)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no 77-token config beside 64-token files
    monkeypatch.undo()
    build_clip_tokenizer(folder, model_max_length=77)
    assert CLIPTokenizer.from_pretrained(folder).model_max_length == 77
    assert (folder / "notes.txt").read_text() == "mine"


def test_missing_open_clip_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tokenizer_module.importlib.util, "find_spec", lambda name: None if name == "open_clip" else real_find_spec(name)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        build_clip_tokenizer()


def test_encode_prompts_is_the_text_encoders_last_hidden_state(tiny_pipeline_path, clip_tokenizer):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline_path, subfolder="text_encoder")
    ids = tokenize_prompts(clip_tokenizer, ["a photo of a cat", ""])
    embeds = encode_prompts(text_encoder, ids)
    assert embeds.shape == (2, 77, text_encoder.config.hidden_size)
    torch.testing.assert_close(embeds, text_encoder(ids).last_hidden_state)
    torch.testing.assert_close(embed_prompts(clip_tokenizer, text_encoder, ["a photo of a cat", ""]), embeds)
    assert not torch.allclose(embeds[0], embeds[1])


def test_tokenizer_build_refuses_a_file_or_an_empty_path(tmp_path, capsys):
    """`latentdiff tokenizer build ''` wrote into the current folder; a file gave a bare 'File exists'."""
    from latentdiff import cli

    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["tokenizer", "build", str(tmp_path / "notes.txt")]) == 2
    assert cli.main(["tokenizer", "build", ""]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: '{tmp_path / 'notes.txt'}' is a file: give the tokenizer's folder (it is created if "
                     "missing).", "error: '' is empty: give the tokenizer's folder (it is created if missing)."]  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "mine"
