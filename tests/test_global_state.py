"""Importing ttt_jax leaves Flax's global configuration, `sys.unraisablehook` and the logging
filters as they were, and the package still builds,
runs and splits models under Flax's own defaults (eager variable sharding on: the layers create
their parameters unplaced themselves, so neither the package nor a user's own model that builds
them directly needs a context or a mesh). A fresh interpreter, so nothing
earlier in the test session has set anything."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import logging, sys
import flax
flags = {k: getattr(flax.config, k) for k in ("flax_always_shard_variable",)}
hook = sys.unraisablehook
filters = {n: list(logging.getLogger(n).filters) for n in ("absl", "asyncio")}
import ttt_jax, ttt_jax.models, ttt_jax.train.trainer, ttt_jax.eval.generate, ttt_jax.cli
after = {k: getattr(flax.config, k) for k in flags}
assert after == flags, f"import ttt_jax changed flax.config: {flags} -> {after}"
assert sys.unraisablehook is hook, "import ttt_jax replaced sys.unraisablehook"
assert {n: list(logging.getLogger(n).filters) for n in filters} == filters, "logging filters"
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ttt_jax.config import base_config, validate
from ttt_jax.models import build_model
from ttt_jax.models.lm import make_mixer
c = base_config()
c.model.update(num_layers=1, d_model=32, num_heads=2, intermediate_size=64)
validate(c)
graphdef, params = nnx.split(build_model(c.model, seed=0))
tokens = np.random.default_rng().integers(0, c.model.vocab_size, (1, 8))
logits, _ = nnx.merge(graphdef, params)(jnp.asarray(tokens))
assert logits.shape == (1, 8, 384) and bool(jnp.all(jnp.isfinite(logits)))
make_mixer(c.model, nnx.Rngs(0))
# a user's own model: the layers built directly, with no mesh and no context of the package's
from ttt_jax.layers.attention import Attention
from ttt_jax.layers.ttt import TTTConfig, TTTMixer
for inner in ("linear", "mlp"):
  layer = TTTMixer(TTTConfig(d_model=32, num_heads=2, inner=inner), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng().standard_normal((1, 16, 32)), jnp.float32)
  y, _ = layer(x, jnp.arange(16), None)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
attn = Attention(32, 2, window=None, rope_theta=1e4, qk_norm=True, norm_eps=1e-6, std=0.02,
                 out_std=0.02, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs=nnx.Rngs(0))
assert attn(x, jnp.arange(16))[0].shape == x.shape
assert flax.config.flax_always_shard_variable == flags["flax_always_shard_variable"]
print("ok")
"""


def test_import_changes_no_flax_flag_and_models_build_under_its_defaults():
  proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
