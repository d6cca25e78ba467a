"""Shared test setup: CPU only, fp32 matmuls at full precision, unoptimized machine code, no
persistent compilation cache (the scripts the tests launch would otherwise fill
~/.cache/ttt_jax/xla; tests/train/test_compilation_cache.py tests the cache itself)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TTT_JAX_COMPILATION_CACHE", "")
from .fast_compile import FAST_COMPILE  # noqa: E402

# XLA:CPU without LLVM's optimization passes and, where the jaxlib has them, with its older
# fusion emitters (fast_compile.py): the test programs are tiny, so compiling them dominates; the
# HLO program is the same, only the machine code is slower and buffer sizes may differ a little
# (tests comparing two programs bit for bit allow for that). Set before any backend starts, so
# the scripts the tests launch inherit it; a flag already in XLA_FLAGS wins (e.g.
# XLA_FLAGS=--xla_backend_optimization_level=3).
_given = os.environ.get("XLA_FLAGS", "").split()
_names = {f.split("=", 1)[0] for f in _given}
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in FAST_COMPILE if f.split("=", 1)[0] not in _names] + _given)

import jax  # noqa: E402
import pytest  # noqa: E402

from ttt_jax.data import pipeline  # noqa: E402
from ttt_jax.train.trainer import Trainer  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _train_steps(config, n: int):
  """Runs `n` train steps of `config` in memory on the training stream (no checkpoints, no
  evaluation); returns (per-step metrics as floats, final state)."""
  trainer = Trainer.create(config)
  state = trainer.init_state()
  it = pipeline.make_iterator(trainer.dataset("train"), prefetch=0)
  history = []
  for _ in range(n):
    state, metrics = trainer.train_step(state, trainer.device_batch(next(it)))
    history.append({k: float(v) for k, v in metrics.items()})
  return history, state


@pytest.fixture
def train_steps():
  """`train_steps(config, n) -> (metrics per step, state)`: a short in-memory training run."""
  return _train_steps



@pytest.fixture
def word_tokenizer():
  """`word_tokenizer(folder, tokens, unk, name='tokenizer.json')`: writes a character-level
  WordLevel `tokenizers` file (ids in the order of `tokens`, `unk` among them) and returns its
  path."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

  def write(folder, tokens, unk, name="tokenizer.json"):
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    path = os.path.join(str(folder), name)
    tk.save(path)
    return path

  return write
