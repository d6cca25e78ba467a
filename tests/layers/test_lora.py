"""LoRA surgery: zero-B adapters are a no-op, unmerged == merged, references for each wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.layers.common import linear
from ttt_jax.layers.lora import (
    LoRALinear,
    LoRAParam,
    LoRASwiGLU,
    apply_lora,
    lora_targets,
    merge_lora,
)
from ttt_jax.layers.mlp import SwiGLU
from ttt_jax.models import build_model


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tiny_config(kind="transformer", scan_layers=False):
  c = build_config(f"model={kind},ctx=32")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 2, 32, 2, 64
  m.scan_layers = scan_layers
  m.window = 16
  m.ttt.mini_batch_size = 8
  m.e2e.mini_batch_size = 16
  m.e2e.prime_intermediate_size = 64
  return c


def randomize_lora(model, seed=1):
  """Non-zero B (and fresh A) so the adapters change the function."""
  lora = nnx.state(model, LoRAParam)
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  nnx.update(model, jax.tree.unflatten(treedef, new))


@jax.jit
def _logits(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)[0][..., :259]


def logits(model, x):
  """Logits over the real vocabulary (padded rows are a constant -1e9), compiled."""
  graphdef, state = nnx.split(model)
  return _logits(graphdef, state, x)


def tokens(seed=0, batch=2, length=32):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 259)


def test_lora_linear_matches_reference():
  rngs = nnx.Rngs(params=0)
  base = linear(24, 40, ("embed", "heads"), std=0.3, compute_dtype=jnp.float32,
                param_dtype=jnp.float32, rngs=rngs, use_bias=True)
  base.bias[...] = jax.random.normal(jax.random.key(5), (40,))
  lin = LoRALinear(base, rank=4, alpha=6.0, rngs=rngs)
  lin.lora.b[...] = jax.random.normal(jax.random.key(6), (4, 40))
  x = jax.random.normal(jax.random.key(7), (3, 5, 24))
  w, b = np.asarray(base.kernel[...], np.float64), np.asarray(base.bias[...], np.float64)
  a, bb = np.asarray(lin.lora.a[...], np.float64), np.asarray(lin.lora.b[...], np.float64)
  xn = np.asarray(x, np.float64)
  ref = xn @ w + b + (6.0 / 4) * (xn @ a) @ bb
  assert rel_err(lin(x), ref) < 1e-6
  assert lin.kernel is base.kernel  # the base Variable itself, not a copy


def test_lora_swiglu_matches_reference():
  rngs = nnx.Rngs(params=0)
  mlp = SwiGLU(16, 48, std=0.3, out_std=0.3, compute_dtype=jnp.float32,
               param_dtype=jnp.float32, rngs=rngs)
  wrapped = LoRASwiGLU(mlp, ("w1", "w2"), rank=3, alpha=3.0, rngs=rngs)
  assert wrapped.lora_w3 is None
  wrapped.lora_w1.b[...] = jax.random.normal(jax.random.key(1), (3, 48))
  wrapped.lora_w2.b[...] = jax.random.normal(jax.random.key(2), (3, 16))
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 7, 16)), np.float64)
  f = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  w1 = f(mlp.w1) + f(wrapped.lora_w1.a) @ f(wrapped.lora_w1.b)
  w2 = f(mlp.w2) + f(wrapped.lora_w2.a) @ f(wrapped.lora_w2.b)
  h = x @ w1
  ref = (h / (1 + np.exp(-h)) * (x @ f(mlp.w3))) @ w2
  assert rel_err(wrapped(jnp.asarray(x, jnp.float32)), ref) < 1e-5


@pytest.mark.parametrize("kind,scan", [("transformer", False), ("swa", True), ("ttt_linear", False),
                                       ("e2e", False), ("e2e", True)])
def test_zero_b_is_noop_and_merged_equals_unmerged(kind, scan):
  cfg = tiny_config(kind, scan)
  model = build_model(cfg.model)
  x = tokens()
  base_graph, base_state = nnx.split(model)
  base_params = nnx.to_pure_dict(base_state)
  y_base = _logits(base_graph, base_state, x)
  adapted = apply_lora(model, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=4, alpha=8.0)
  assert adapted and any(p.endswith("mlp") for p in adapted)
  y_zero = logits(model, x)
  # B = 0 adds exact zeros; only XLA's fusion of the extra terms may round the sums differently
  # (one float32 ulp: measured 6e-8 at most)
  np.testing.assert_allclose(np.asarray(y_zero), np.asarray(y_base), rtol=0,
                             atol=1e-6 * float(np.abs(np.asarray(y_base)).max()))
  randomize_lora(model)
  y_lora = logits(model, x)
  assert rel_err(y_lora, y_base) > 1e-3  # the adapters do act
  merged = merge_lora(base_params, nnx.to_pure_dict(nnx.state(model, LoRAParam)), 8.0 / 4)
  nnx.replace_by_pure_dict(base_state, merged)
  y_merged = _logits(base_graph, base_state, x)  # the plain model with merged weights
  assert rel_err(y_merged, y_lora) < 1e-5


def test_base_paths_unchanged_and_axis_names():
  model = build_model(tiny_config("transformer", scan_layers=True).model)
  before = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model)))
  apply_lora(model, ("wq", "w2"), rank=4, alpha=4.0)
  _, lora, rest = nnx.split(model, LoRAParam, ...)
  assert jax.tree.map(jnp.shape, nnx.to_pure_dict(rest)) == before
  specs = nnx.to_pure_dict(nnx.get_partition_spec(lora))
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(lora))
  wq = specs["blocks"]["mixer"]["wq"]["lora"]
  assert tuple(wq["a"]) == ("layers", "embed", None) and tuple(wq["b"]) == ("layers", None, "heads")
  w2 = specs["blocks"]["mlp"]["lora_w2"]
  assert tuple(w2["a"]) == ("layers", "mlp", None) and tuple(w2["b"]) == ("layers", None, "embed")
  assert shapes["blocks"]["mlp"]["lora_w2"] == {"a": (2, 64, 4), "b": (2, 4, 32)}
  assert "w1" not in specs["blocks"]["mlp"] and "lora_w1" not in specs["blocks"]["mlp"]


def test_unknown_target_is_rejected():
  model = build_model(tiny_config().model)
  assert set(lora_targets(model)) >= {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
  with pytest.raises(ValueError, match="q_proj"):
    apply_lora(model, ("q_proj",), rank=2, alpha=2.0)
  with pytest.raises(ValueError, match="wg"):
    apply_lora(model, ("wg",), rank=2, alpha=2.0)  # known name, but nothing in this model
