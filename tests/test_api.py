"""The package's public API (`ttt_jax.__all__`): every name resolves to the object its module
defines, loaded on first use, so `import ttt_jax` alone imports none of the package's modules
(a fresh interpreter: nothing earlier in the session has imported them)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import ttt_jax

CHECK = """
import sys
import ttt_jax
loaded = sorted(m for m in sys.modules if m.startswith("ttt_jax."))
assert not loaded and "jax" not in sys.modules, loaded
cfg = ttt_jax.build_config("model=ttt_linear,scale=tiny,ctx=64")
assert "ttt_jax.config" in sys.modules and "ttt_jax.train.trainer" not in sys.modules
cfg.model.mixer = "no_such_mixer"  # the mixers' own checks run (the layers registered them)
try:
  ttt_jax.validate(cfg)
except ttt_jax.ConfigError as e:
  assert "model.mixer='no_such_mixer'" in str(e), e
else:
  raise AssertionError("validate accepted an unknown mixer")
print("ok")
"""


def test_import_alone_loads_no_module_of_the_package():
  proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("name", ttt_jax.__all__)
def test_every_public_name_is_its_modules_object(name):
  module = importlib.import_module(ttt_jax._API[name])  # noqa: SLF001
  assert getattr(ttt_jax, name) is getattr(module, name)
  assert name in dir(ttt_jax)


def test_an_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="has no attribute 'TTTLinear'"):
    ttt_jax.TTTLinear  # noqa: B018


def test_the_docstring_example_builds_and_runs_a_ttt_layer():
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  layer = ttt_jax.TTTMixer(ttt_jax.TTTConfig(d_model=64, num_heads=4, inner="linear"),
                           rngs=nnx.Rngs(0))  # no ConfigDict anywhere
  x = jnp.asarray(np.random.default_rng().standard_normal((2, 32, 64)), jnp.float32)
  y, _ = layer(x, jnp.arange(32), None)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.abs(y - x).max()) > 0  # the layer did something


def test_a_model_config_builds_the_same_model_as_its_configdict():
  """`build_model` takes the `config.model` section or the frozen `ModelConfig` made from it."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  section = ttt_jax.build_config("model=ttt_linear,scale=tiny,ctx=64").model
  cfg = ttt_jax.model_config(section)
  assert isinstance(cfg, ttt_jax.ModelConfig) and cfg.ttt.mini_batch_size == 16
  a, b = (jax.tree.leaves(nnx.state(ttt_jax.build_model(c, seed=3), nnx.Param))
          for c in (section, cfg))
  assert all(bool((x == y).all()) for x, y in zip(a, b, strict=True))


def test_validate_runs_the_mixer_checks_whatever_was_imported():
  """config.validate loads the mixer registry itself: with only ttt_jax.config imported, an
  unknown mixer still fails (it passed when nothing had imported ttt_jax.layers)."""
  code = """
from ttt_jax.config import ConfigError, build_config, validate
c = build_config("model=transformer,scale=tiny,ctx=64")
c.model.mixer = "bogus"
try:
  validate(c)
except ConfigError as e:
  print(e)
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "model.mixer='bogus'" in proc.stdout, proc.stderr[-2000:]
