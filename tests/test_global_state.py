"""Importing ttt_jax leaves Flax's global configuration as it was, and the package still builds,
runs and splits models under Flax's own defaults (the modules are built inside
`lazy_variable_sharding()` where they are built). A fresh interpreter, so nothing earlier in the
test session has set anything."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import flax
flags = {k: getattr(flax.config, k) for k in ("flax_always_shard_variable",)}
import ttt_jax, ttt_jax.models, ttt_jax.train.trainer, ttt_jax.eval.generate, ttt_jax.cli
after = {k: getattr(flax.config, k) for k in flags}
assert after == flags, f"import ttt_jax changed flax.config: {flags} -> {after}"
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
assert flax.config.flax_always_shard_variable == flags["flax_always_shard_variable"]
print("ok")
"""


def test_import_changes_no_flax_flag_and_models_build_under_its_defaults():
  proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
