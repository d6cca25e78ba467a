"""Language models with TTT mixers: streaming equals one shot, and they learn the corpus."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.models import build_model


def tiny_config(kind: str, backbone: str = "mamba", steps: int = 20):
  c = build_config(f"model={kind},scale=tiny,ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 1, 64, 4, 128
  m.ttt.backbone = backbone
  c.data.batch_size = 4
  c.train.steps, c.train.warmup_steps, c.train.lr = steps, 5, 3e-3
  return c


def test_lm_streaming_equals_one_shot():
  """Mamba backbone (block conv + Q/K convs carried too), chunks crossing mini-batches."""
  cfg = tiny_config("ttt_linear", "mamba").model
  cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.ttt.mini_batch_size = 2, 32, 2, 4
  model = build_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)

  @jax.jit
  def run(p, toks, positions, cache):
    return nnx.merge(graphdef, p)(toks, positions, cache)

  full, _ = run(params, tokens, jnp.arange(16, dtype=jnp.int32), None)
  cache, outs, t = model.init_cache(2), [], 0
  for c in (6, 6, 4):
    logits, cache = run(params, tokens[:, t:t + c], jnp.arange(t, t + c, dtype=jnp.int32), cache)
    outs.append(logits)
    t += c
  err = jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - full)) / jnp.max(jnp.abs(full))
  assert float(err) <= 1e-5


@pytest.mark.parametrize("kind,backbone", [("ttt_linear", "mamba"), ("ttt_mlp", "base")])
def test_tiny_ttt_lm_learns(kind, backbone, train_steps):
  config = tiny_config(kind, backbone)
  history, _ = train_steps(config, config.train.steps)
  losses = [h["loss"] for h in history]
  assert all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses  # starts near ln(259) = 5.56
