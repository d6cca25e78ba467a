"""Shared fixtures of the evaluation tests: a folder of text with one long document, the config
of a tiny run, and a tiny trained run (SWA, 2 steps) whose checkpoint the command-line tests
evaluate. (Tests are imported with --import-mode=importlib: helpers reach them as fixtures.)"""

from __future__ import annotations

import pathlib

import pytest

from ttt_jax.config import build_config
from ttt_jax.train.loop import train_and_evaluate

# 20 short documents (60-250 bytes) and one long one ("book.txt", 3000 bytes): byte tokens
SHORT_DOCS = {f"note{i:02d}.txt": " ".join(f"w{i}_{j}" for j in range(12 + 6 * i))
              for i in range(20)}
BOOK = "".join(f"line {j}: the quick brown fox {j % 7} jumps over the lazy dog.\n"
               for j in range(60))[:3000]


def write_texts(root: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  for name, text in SHORT_DOCS.items():
    (root / name).write_text(text)
  (root / "book.txt").write_text(BOOK)
  return root


@pytest.fixture(scope="session")
def text_docs() -> dict[str, str]:
  """The documents of `texts`: {file name: text}."""
  return {**SHORT_DOCS, "book.txt": BOOK}


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> pathlib.Path:
  """A folder source: SHORT_DOCS and book.txt."""
  return write_texts(tmp_path_factory.mktemp("eval_texts") / "texts")


def tiny_run_config(source: str, kind: str = "swa", steps: int = 2):
  """A tiny model (1 layer, d_model 32) reading 32-token windows of `source`."""
  c = build_config(f"model={kind},scale=tiny,ctx=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.model.intermediate_size, c.model.window = 64, 16
  c.data.source, c.data.val_fraction, c.data.batch_size = str(source), 0.3, 2
  c.train.steps, c.train.warmup_steps, c.train.eval_every, c.train.eval_batches = steps, 1, steps, 1
  c.eval.chunk, c.eval.max_docs, c.eval.ctx, c.eval.first_bucket = 32, 4, "32,64", 8
  return c


@pytest.fixture(scope="session")
def run_config():
  """`run_config(source, kind='swa', steps=2)`: the config of a tiny run."""
  return tiny_run_config


@pytest.fixture(scope="session")
def trained_run(texts, tmp_path_factory) -> str:
  """The workdir of a tiny SWA run trained for 2 steps on `texts`."""
  workdir = str(tmp_path_factory.mktemp("eval_run") / "swa")
  train_and_evaluate(tiny_run_config(texts), workdir, echo=lambda s: None)
  return workdir
