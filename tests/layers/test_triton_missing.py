"""A JAX without Pallas' Triton backend (deprecated since JAX 0.11, to be removed in a later
JAX): the package imports and runs, `auto` takes XLA's paths on a GPU, and `pallas` is refused
in one line that names its knob."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.layers import cache_attention, common, ttt_pallas_linear
from ttt_jax.layers.attention_kernels import resolve_cache_impl
from ttt_jax.layers.common import building_for
from ttt_jax.layers.ttt import TTTMixer, resolve_impl

from .test_ttt import mixer_cfg
from .test_ttt_pallas import inputs

ROOT = Path(__file__).resolve().parents[2]


def test_auto_takes_xla_and_pallas_is_refused_without_the_triton_backend(monkeypatch):
  if common.pltriton is not None:  # this JAX has the backend ...
    assert common.triton_missing("model.ttt.impl") is None
    with building_for("gpu"):
      assert resolve_impl("auto", "linear", 16) == "pallas"
      assert resolve_cache_impl("auto") == "pallas"
  monkeypatch.setattr(common, "pltriton", None)  # ... a later one may not
  with building_for("gpu"):
    assert resolve_impl("auto", "linear", 16) == "dual"
    assert resolve_cache_impl("auto") == "inherit"
    assert resolve_cache_impl("inherit") == "inherit"
    with pytest.raises(ConfigError, match=r"^model.cache_attention_impl=pallas: this JAX \("):
      resolve_cache_impl("pallas")
    for platform_ in ("gpu", "cpu"):  # on CPU the kernels would run interpreted: refused too
      with building_for(platform_), pytest.raises(
          ConfigError, match=r"^model.ttt.impl=pallas: this JAX .*no Pallas Triton backend"):
        nnx.eval_shape(lambda: TTTMixer(mixer_cfg(impl="pallas"), rngs=nnx.Rngs(0)))
    mixer = nnx.eval_shape(lambda: TTTMixer(mixer_cfg(impl="auto"), rngs=nnx.Rngs(0)))
    assert mixer.impl == "dual"
  # code that calls a kernel directly gets the same one line
  with pytest.raises(ConfigError, match=r"^model.ttt.impl=pallas: this JAX"):
    ttt_pallas_linear.linear_sequence(*inputs("linear", n=2), interpret=True)
  q, kv = jnp.ones((1, 4, 2, 16), jnp.float32), jnp.ones((1, 256, 2, 16), jnp.float32)
  with pytest.raises(ConfigError, match=r"^model.cache_attention_impl=pallas: this JAX"):
    cache_attention.filled_attention_pallas(q, kv, kv, jnp.arange(4), jnp.arange(256), 256,
                                            interpret=True)


# a process whose JAX cannot import the Triton backend: the package imports, a model built for
# a GPU takes XLA's paths, and TTT-Linear and a full-attention cache run on CPU
NO_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # `import` of it raises ImportError
import jax.numpy as jnp, numpy as np
import ttt_jax.cli, ttt_jax.train.trainer
from ttt_jax.config import build_config
from ttt_jax.layers import common
from ttt_jax.layers.common import building_for
from ttt_jax.models import build_model
assert common.pltriton is None
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64)), jnp.int32)
for kind in ("ttt_linear", "transformer"):
  m = build_config(f"model={kind},ctx=256").model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.intermediate_size = 2, 64, 4, 4, 128
  with building_for("gpu"):
    gpu = build_model(m, seed=0)
  mixer = gpu.blocks[0].mixer
  print(kind, getattr(mixer, "impl", None), getattr(getattr(mixer, "algorithm", None),
                                                      "cache_impl", None))
  logits = build_model(m, seed=0)(tokens, jnp.arange(64, dtype=jnp.int32))[0]
  print(kind, "finite", bool(jnp.isfinite(logits).all()), logits.shape)
"""


def test_the_package_runs_on_a_jax_without_the_triton_backend():
  out = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-1500:]
  lines = out.stdout.splitlines()
  assert "ttt_linear dual None" in lines and "transformer None inherit" in lines, lines
  for kind in ("ttt_linear", "transformer"):
    assert any(line.startswith(f"{kind} finite True (2, 64, ") for line in lines), lines
