"""Pretraining presets: `configs/pretrain.py:model=e2e,scale=125m,ctx=8k`.

`get_config(arg)` takes a comma list of `key=value`:
  model  transformer | swa | ttt_linear | ttt_mlp | e2e   (default transformer)
  scale  tiny | 125m | 350m | 760m | 1b | 3b               (default tiny)
  ctx    1k | 2k | 4k | 8k | 16k | 32k | 64k | 128k (or an integer)   (default 2k)
  mode   meta | pretrain  (e2e only; default meta)
Every field can then be overridden from the command line, e.g. `--config.train.steps=50`.
"""

from ttt_jax.config import build_config


def get_config(arg: str | None = None):
  return build_config(arg)
