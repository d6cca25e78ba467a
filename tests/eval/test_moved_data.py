"""A trained run does not depend on its data folder: after the prepared folder it trained on (which
holds the run's BPE tokenizer) moved away, generate.py, evaluate.py --data and convert.py --export
work with the run's own copy of its tokenizer; evaluating the run's own data fails in one line
naming the folder and --data."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

import ttt_jax
from ttt_jax.data import prepare
from ttt_jax.runs.load import load_run

from ..repo_files import load_file


def script(name: str):
  return load_file(f"scripts/{name}.py").main


@pytest.fixture(scope="module")
def moved(texts, run_config, tmp_path_factory) -> dict:
  """A transformer run trained on a prepared folder with its own BPE tokenizer; the folder is
  then moved away."""
  root = tmp_path_factory.mktemp("moved")
  data = root / "D"
  prepare.prepare(str(texts), str(data), train_tokenizer="bpe", vocab_size=300,
                  val_fraction=0.3, num_shards=1, echo=lambda s: None)
  workdir = str(root / "run")
  ttt_jax.train_and_evaluate(run_config(data, "transformer"), workdir, echo=lambda s: None)
  tokenizer = load_run(workdir).data.tokenizer
  shutil.move(data, root / "D_moved")
  return {"workdir": workdir, "data": str(data), "name": tokenizer.name,
          "fingerprint": tokenizer.fingerprint()}


def test_load_run_has_the_runs_own_tokenizer(moved):
  tokenizer = load_run(moved["workdir"]).data.tokenizer
  assert (tokenizer.name, tokenizer.fingerprint()) == (moved["name"], moved["fingerprint"])


def test_generate_after_the_data_folder_moved(moved, capsys):
  script("generate")(["--workdir", moved["workdir"], "--prompt", "line 1", "--max_new_tokens",
                      "3", "--no_progress"])
  assert capsys.readouterr().out.startswith("line 1")


def test_evaluate_other_data_after_the_data_folder_moved(moved, texts, capsys):
  script("evaluate")(["--workdir", moved["workdir"], "--data", str(texts), "--ctx", "32",
                      "--max_docs", "2", "--no_progress"])
  out = pathlib.Path(moved["workdir"]) / "eval" / f"data-{texts.name}-all" / "results.json"
  res = json.loads(out.read_text())
  assert (res["source"], res["tokenizer"]) == (str(texts), moved["name"])


def test_export_after_the_data_folder_moved(moved, tmp_path, capsys):
  out = tmp_path / "hf"
  script("convert")(["--export", moved["workdir"], "--out", str(out)])
  assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_evaluating_the_runs_own_data_names_the_missing_folder(moved, capsys):
  with pytest.raises(SystemExit) as e:
    script("evaluate")(["--workdir", moved["workdir"], "--ctx", "32", "--no_progress"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and len(err.splitlines()) == 1, err
  assert f"data.source={moved['data']!r}, the data this run trained on, cannot be read " \
         "(no such file or folder); --data chooses other data" in err, err
  assert not os.path.exists(os.path.join(moved["workdir"], "eval", "results.json"))
