"""`scripts/convert.py` (what `make pretrained` runs) a second time with the same source and
options does nothing and says so in one line; other options, or another source, into the same
--out fail in one line before anything is converted; --overwrite imports again."""

from __future__ import annotations

import os
import runpy

import numpy as np
import pytest

from ttt_jax.interop import gguf as convert_gguf
from ttt_jax.runs.load import load_run

from .llama_reference import random_llama
from .test_gguf import tiny_vocab, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def convert():
  return runpy.run_path(os.path.join(ROOT, "scripts", "convert.py"), run_name="convert")["main"]


def test_second_import_is_a_no_op_that_says_so(tmp_path, convert, capsys, monkeypatch):
  cfg, tensors = random_llama(seed=int(np.random.default_rng().integers(1 << 16)), tied=True,
                              vocab_size=len(tiny_vocab()))
  src = write_gguf(tmp_path / "m.gguf", cfg, tensors)
  out = str(tmp_path / "run")
  args = ["--from", f"gguf:{src}", "--out", out, "--seq_len", "64"]
  convert(args)
  assert "wrote" in capsys.readouterr().out
  before = load_run(out).params

  def no_conversion(*a, **k):
    raise AssertionError("the model was converted again")

  monkeypatch.setattr(convert_gguf, "read_tensors", no_conversion)
  convert(args)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "already holds this import" in lines[0] and "nothing to do" in \
      lines[0]
  np.testing.assert_array_equal(load_run(out).params["embed"]["embedding"],
                                before["embed"]["embedding"])
  # other options (or another file) into the same run directory: refused before converting
  with pytest.raises(SystemExit) as e:
    convert(["--from", f"gguf:{src}", "--out", out, "--seq_len", "128"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code != 0 and len(err) == 1 and "pass --overwrite" in err[0]
  monkeypatch.undo()
  convert([*args[:-1], "128", "--overwrite"])
  assert "wrote" in capsys.readouterr().out and load_run(out).config.data.seq_len == 128
