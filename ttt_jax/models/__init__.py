"""Model construction from a config."""

from __future__ import annotations

import ml_collections
from flax import nnx


def build_model(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """The model named by `model.kind`; every model has `compute_loss(batch, step)`."""
  rngs = nnx.Rngs(params=seed)
  if model_cfg.kind == "e2e":
    from ttt_jax.models.e2e import E2EModel  # noqa: PLC0415

    return E2EModel(model_cfg, rngs=rngs)
  from ttt_jax.models.lm import LanguageModel  # noqa: PLC0415

  return LanguageModel(model_cfg, rngs=rngs)
