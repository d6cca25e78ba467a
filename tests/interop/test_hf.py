"""HF Llama import (safetensors) against an independent NumPy forward pass; export round trip;
one-line failures for what cannot be mapped."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.eval.generate import generate_text
from ttt_jax.interop.hf import export_hf, import_hf
from ttt_jax.interop.llama import ConvertError
from ttt_jax.runs.load import load_run
from ttt_jax.runs.workdir import WorkdirBusy, WorkdirLock

from ..repo_files import load_file
from .llama_reference import llama_logits, random_llama

TOKENS = np.array([256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 5])


def write_hf(folder, cfg, tensors):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
  return str(folder)


def run_logits(workdir, tokens=TOKENS):
  run = load_run(str(workdir))
  model = nnx.merge(run.graphdef, run.params)
  logits, _ = model(jnp.asarray(tokens)[None])
  return run, np.asarray(logits[0], np.float64)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_import_matches_numpy_llama(tmp_path, tied):
  cfg, tensors = random_llama(seed=1, tied=tied, max_position_embeddings=512)
  src = write_hf(tmp_path / "hf", cfg, tensors)
  import_hf(src, str(tmp_path / "run"), tokenizer="bytes", seq_len=64, echo=None)
  run, logits = run_logits(tmp_path / "run")
  assert run.config.model.num_kv_heads == 2 and run.config.model.vocab_size == 259
  # RoPE base (5e4, not the default 1e4) and trained context from config.json
  assert (run.config.model.rope_theta, run.config.model.trained_context) == (5e4, 512)
  assert run.params["embed"]["embedding"].shape == (384, 64)  # odd vocab padded to 128s
  ref = llama_logits(cfg, tensors, TOKENS)
  np.testing.assert_allclose(logits[:, :259], ref, rtol=2e-4, atol=2e-4)
  assert np.all(logits[:, 259:] < -1e8)  # padding rows never predicted
  text = generate_text(run, "ab", 4, progress=False)
  assert isinstance(text, str)
  run.config.model.trained_context, lines = 4, []  # past the trained context: one line
  generate_text(run, "ab", 4, progress=False, echo=lines.append)
  assert len(lines) == 1 and "trained at (4, model.trained_context)" in lines[0], lines


def test_evaluate_past_the_trained_context_warns_in_one_line(tmp_path, capsys):
  cfg, tensors = random_llama(seed=4, max_position_embeddings=32)
  import_hf(write_hf(tmp_path / "hf", cfg, tensors), str(tmp_path / "run"), tokenizer="bytes",
            seq_len=64, echo=None)
  script = load_file("scripts/evaluate.py")
  script.main(["--workdir", str(tmp_path / "run"), "--ctx", "32,64", "--max_docs", "1",
               "--no_progress"])
  lines = [x for x in capsys.readouterr().err.splitlines() if "trained at" in x]
  assert lines == ["warning: --ctx = 64 tokens is longer than the context the model was trained "
                   "at (32, model.trained_context): positions past it were never trained"]


def test_export_round_trip_gives_identical_logits(tmp_path):
  cfg, tensors = random_llama(seed=2)
  import_hf(write_hf(tmp_path / "hf", cfg, tensors), str(tmp_path / "a"), tokenizer="bytes",
            seq_len=64, echo=None)
  export_hf(str(tmp_path / "a"), str(tmp_path / "exported"), echo=None)
  out = safetensors.numpy.load_file(str(tmp_path / "exported" / "model.safetensors"))
  assert set(out) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(out[k], v)
  with open(tmp_path / "exported" / "config.json") as f:
    exported = json.load(f)
  assert exported["num_key_value_heads"] == 2 and exported["rope_theta"] == cfg["rope_theta"]
  assert exported["max_position_embeddings"] == 2048  # config.json's (HF default), not seq_len
  import_hf(str(tmp_path / "exported"), str(tmp_path / "b"), tokenizer="bytes", seq_len=64,
            echo=None)
  _, a = run_logits(tmp_path / "a")
  _, b = run_logits(tmp_path / "b")
  np.testing.assert_array_equal(a, b)


def test_unknown_tensor_and_architecture_fail_in_one_line(tmp_path):
  cfg, tensors = random_llama()
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  src = write_hf(tmp_path / "hf", cfg, tensors)
  with pytest.raises(ConvertError, match=r"unknown tensor 'model.layers.0.self_attn.q_proj.bias'"):
    import_hf(src, str(tmp_path / "r"), tokenizer="bytes", echo=None)
  cfg2 = dict(cfg, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
  src2 = write_hf(tmp_path / "hf2", cfg2, tensors)
  with pytest.raises(ConvertError, match="architecture 'gpt_neox'"):
    import_hf(src2, str(tmp_path / "r2"), tokenizer="bytes", echo=None)
  with pytest.raises(ConvertError, match="no tokenizer.json"):
    import_hf(src, str(tmp_path / "r3"), echo=None)


def test_existing_workdir_needs_overwrite(tmp_path):
  cfg, tensors = random_llama()
  src = write_hf(tmp_path / "hf", cfg, tensors)
  import_hf(src, str(tmp_path / "r"), tokenizer="bytes", seq_len=32, echo=None)
  # the same import again: nothing to do; another one (other options) needs --overwrite
  assert import_hf(src, str(tmp_path / "r"), tokenizer="bytes", seq_len=32, echo=None) is None
  with pytest.raises(ConfigError, match="--overwrite"):
    import_hf(src, str(tmp_path / "r"), tokenizer="bytes", seq_len=64, echo=None)


def test_overwrite_never_touches_a_workdir_in_use(tmp_path):
  """convert --overwrite into a workdir a live run holds: refused, its checkpoints kept."""
  cfg, tensors = random_llama()
  src = write_hf(tmp_path / "hf", cfg, tensors)
  out = str(tmp_path / "r")
  import_hf(src, out, tokenizer="bytes", seq_len=32, echo=None)
  before = sorted(os.listdir(os.path.join(out, "checkpoints")))
  with WorkdirLock(out):  # what a training run in `out` holds
    with pytest.raises(WorkdirBusy, match="is in use by another run"):
      import_hf(src, out, tokenizer="bytes", seq_len=32, overwrite=True, echo=None)
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
  import_hf(src, out, tokenizer="bytes", seq_len=32, overwrite=True, echo=None)  # free again


@pytest.mark.parametrize("damage", ["config_not_json", "config_a_list", "truncated_tensors",
                                    "truncated_header", "empty_tensors"])
def test_damaged_hf_files_fail_in_one_line_naming_the_file(tmp_path, damage):
  """A damaged config.json or a truncated safetensors file is one ConvertError naming the file
  (a JSONDecodeError / reshape traceback before), and nothing is written."""
  cfg, tensors = random_llama()
  src = write_hf(tmp_path / "hf", cfg, tensors)
  weights, config = os.path.join(src, "model.safetensors"), os.path.join(src, "config.json")
  data = open(weights, "rb").read()
  if damage == "config_not_json":
    open(config, "w").write('{"model_type": "llama",')
  elif damage == "config_a_list":
    open(config, "w").write("[1, 2]")
  else:
    keep = {"truncated_tensors": len(data) // 2, "truncated_header": 20, "empty_tensors": 0}
    open(weights, "wb").write(data[:keep[damage]])
  with pytest.raises(ConvertError) as e:
    import_hf(src, str(tmp_path / "r"), tokenizer="bytes", echo=None)
  named = config if damage.startswith("config") else weights
  assert str(e.value).startswith(f"{named}: ") and "\n" not in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / "r")


def test_sharded_folder_reads_the_indexed_shards_only(tmp_path):
  """A sharded checkpoint is read through model.safetensors.index.json: the consolidated copy
  of the weights under their original names that some repositories ship beside the shards is
  not read (it would fail as unknown tensors); a missing shard or a damaged index is one line
  naming the index."""
  cfg, tensors = random_llama(seed=4)
  ref_dir = write_hf(tmp_path / "one", cfg, tensors)
  import_hf(ref_dir, str(tmp_path / "r1"), tokenizer="bytes", seq_len=64, echo=None)
  src = tmp_path / "sharded"
  write_hf(src, cfg, {})
  os.remove(src / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(src / file))
  index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
  (src / "model.safetensors.index.json").write_text(json.dumps(index))
  safetensors.numpy.save_file({"layers.0.attention.wq.weight": np.ones((2, 2), np.float32)},
                              str(src / "consolidated.safetensors"))
  import_hf(str(src), str(tmp_path / "r2"), tokenizer="bytes", seq_len=64, echo=None)
  np.testing.assert_array_equal(run_logits(tmp_path / "r2")[1], run_logits(tmp_path / "r1")[1])
  os.remove(src / "model-00002-of-00002.safetensors")
  with pytest.raises(ConvertError, match=r"index.json names 1 missing file\(s\), e.g. model-00002"):
    import_hf(str(src), str(tmp_path / "r3"), tokenizer="bytes", echo=None)
  for damaged in ("{not json", json.dumps({"weight_map": {"a": 1}}), json.dumps([1])):
    (src / "model.safetensors.index.json").write_text(damaged)
    with pytest.raises(ConvertError, match=r"index.json: not a safetensors index"):
      import_hf(str(src), str(tmp_path / "r4"), tokenizer="bytes", echo=None)
