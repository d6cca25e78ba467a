"""Model construction from a config."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ttt_jax.models.e2e import E2EModel
from ttt_jax.models.lm import LanguageModel
from ttt_jax.sharding import lazy_variable_sharding


def build_model(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The model named by `model.kind`; every model has `compute_loss(batch, step)`."""
  rngs = nnx.Rngs(params=seed)
  with lazy_variable_sharding():
    if model_cfg.kind == "e2e":
      return E2EModel(model_cfg, rngs=rngs)
    return LanguageModel(model_cfg, rngs=rngs)
