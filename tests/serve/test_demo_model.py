"""The offline demo model: it loads in transformers, chats through its template and builds deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.demo import build_demo_model, demo_dialogues, ensure_demo_model
from serve.demo.build import BUILD_INFO_FILE
from serve.demo.tokenizer import END
from serve.demo.training import encode_dialogue

# Enough for the template and <|end|> to be learned, well short of the default build.
TEST_STEPS = 250


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo", steps=TEST_STEPS, progress=False)


def _greedy(model_dir: Path, content: str) -> tuple[list[int], str, int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=32, do_sample=False)
    new = output[0, prompt["input_ids"].shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True), tokenizer.eos_token_id


def test_files_and_config(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    # vLLM's CPU attention supports head_dim 64, not smaller.
    assert config["head_dim"] == 64
    # float32 so vLLM (when asked for float32) and transformers/peft agree token for token.
    assert config["dtype"] == "float32"
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    end_id = tokenizer.convert_tokens_to_ids(END)
    assert tokenizer.eos_token == END
    assert tokenizer.pad_token_id not in (None, end_id)
    assert config["eos_token_id"] == end_id
    assert json.loads((demo_dir / "generation_config.json").read_text())["eos_token_id"] == end_id
    assert 2000 <= len(tokenizer) <= 4000
    info = json.loads((demo_dir / BUILD_INFO_FILE).read_text())
    assert info["steps"] == TEST_STEPS
    assert (demo_dir / "model.safetensors").is_file()


def test_chat_template_renders(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="Unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_training_ids_match_the_template(demo_dir: Path) -> None:
    """Labels are aligned to the ids the server will feed: encoding piecewise equals rendering whole."""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    for dialogue in demo_dialogues():
        ids, labels = encode_dialogue(tokenizer, dialogue)
        assert ids == tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=True)["input_ids"]
        learned = tokenizer.decode([label for label in labels if label != -100])
        assert learned == dialogue[-1]["content"] + END


def test_greedy_answers_differ_and_stop(demo_dir: Path) -> None:
    first, first_text, eos = _greedy(demo_dir, "What colour is grass?")
    second, second_text, _ = _greedy(demo_dir, "What sound does a dog make?")
    assert first[-1] == eos, first_text
    assert second[-1] == eos, second_text
    assert first_text.strip() and first_text != second_text


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a = build_demo_model(tmp_path / "a", seed=1, steps=3, progress=False)
    b = build_demo_model(tmp_path / "b", seed=1, steps=3, progress=False)
    c = build_demo_model(tmp_path / "c", seed=2, steps=3, progress=False)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_rebuild_replaces_in_place_and_ensure_skips_built(tmp_path: Path) -> None:
    out = build_demo_model(tmp_path / "demo", seed=1, steps=2, progress=False)
    (out / "stale.txt").write_text("from the previous build")
    build_demo_model(out, seed=1, steps=3, progress=False)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / BUILD_INFO_FILE).read_text())["steps"] == 3
    # Nothing half-built or moved aside is left next to the model.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    before = (out / "config.json").stat().st_mtime_ns
    assert ensure_demo_model(out, progress=False) == out
    assert (out / "config.json").stat().st_mtime_ns == before


def test_steps_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        build_demo_model(tmp_path / "demo", steps=0, progress=False)
    assert not any(tmp_path.iterdir())
