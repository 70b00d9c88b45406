"""A Hugging Face model directory as MODEL: `helix plan DIR` builds it from config.json on meta
(no weight read), `helix run DIR --weights DIR` loads each rank's slices from its safetensors and
matches the unsharded model read from the same files."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helix_compiler.cli.main import _main
from helix_compiler.hf_dir import load_hf_dir
from helix_compiler.modelspec import load_model_spec


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small LlamaModel (GQA: 8 heads, 2 kv heads, d 16) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaModel

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=256, num_hidden_layers=2, vocab_size=256,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(path)
    return path


def _run(capsys, *argv):
    code = _main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_hf_dir_plans_from_config_on_meta_without_reading_weights(llama_dir):
    model, args, kwargs = load_hf_dir(str(llama_dir), batch=3, seq=40, init="meta")
    assert type(model).__name__ == "LlamaModel"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert tuple(args[0].shape) == (3, 40) and kwargs["use_cache"] is False
    assert tuple(kwargs["attention_mask"].shape) == (3, 40)


def test_hf_dir_empty_init_keeps_buffers_real_and_parameters_on_meta(llama_dir):
    model, *_ = load_hf_dir(str(llama_dir), init="empty")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_helix_plan_of_an_hf_directory_reports_its_sites(capsys, llama_dir):
    code, out, err = _run(capsys, "plan", llama_dir, "--devices", 8, "--batch", 4, "--seq", 256,
                          "--format", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["devices"] == 8
    assert len(plan["sites"]) == 2
    site = plan["sites"][0]["site"]
    assert (site["num_heads"], site["num_kv_heads"], site["head_dim"]) == (8, 2, 16)
    assert (site["batch"], site["q_len"]) == (4, 256)


def test_batch_and_seq_are_refused_for_a_python_model_spec(capsys):
    code = _main(["plan", "examples/nanogpt.py", "--devices", "2", "--seq", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--batch / --seq apply to a Hugging Face model directory" in err


def test_a_directory_without_a_config_is_not_an_hf_model(tmp_path):
    from helix_compiler.errors import HelixError

    with pytest.raises(HelixError, match="is a directory"):
        load_model_spec(str(tmp_path))


@pytest.mark.slow
def test_helix_run_of_an_hf_directory_reads_rank_slices_from_its_safetensors(capsys, llama_dir, tmp_path):
    summary = tmp_path / "summary.json"
    # m = 2: each rank reads half of every head's q/k/v columns and o_proj rows from the
    # safetensors (two processes: a torchrun launch costs ~15 s of CPU a process here;
    # test_weights runs m x n = 2 x 2 from a checkpoint file, test_weights' in-process tests
    # every safetensors slice against the model's)
    code, out, err = _run(capsys, "run", llama_dir, "--weights", llama_dir, "--devices", 2,
                          "--backend", "gloo", "--plan", "2,1", "--seq", 24, "--steps", 1,
                          "--timeout", 240, "--json", summary)
    assert code == 0, err
    assert re.search(r"helix run: 2 ranks, m=2 x n=1", out), out
    data = json.loads(summary.read_text())
    assert data["max_relative_error"] <= 1e-5
