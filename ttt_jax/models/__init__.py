"""Model construction from a config."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax.models.config import ModelConfig, model_config
from ttt_jax.models.e2e import E2EModel
from ttt_jax.models.lm import LanguageModel


def build_model(model_cfg: ml_collections.ConfigDict | ModelConfig, seed: int = 0) -> nnx.Module:
  """The model named by `model.kind`; every model has `compute_loss(batch, step)`.

  `model_cfg` is the `config.model` section (made into a frozen `ModelConfig` here) or a
  `ModelConfig`. Parameters are created unplaced (layers/common.py), so no mesh is needed."""
  cfg = model_config(model_cfg)
  rngs = nnx.Rngs(params=seed)
  if cfg.kind == "e2e":
    return E2EModel(cfg, rngs=rngs)
  return LanguageModel(cfg, rngs=rngs)


def abstract_model(model_cfg: ml_collections.ConfigDict | ModelConfig, seed: int = 0):
  """(graphdef, abstract nnx.State of parameters) without allocating any weights."""
  return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, seed)))


def count_params(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))
