"""The sequence-mixer registry: a new mixer or TTT variant is one module plus its registration.

The toy mixers here are registered by the tests alone (no package code names them) and build,
stream and train like the built-in ones; no package module outside the registrations compares
`model.mixer` / `model.kind` / a TTT inner model against a registered name.
"""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers import mixers, ttt_inner, ttt_variants
from ttt_jax.layers.common import linear
from ttt_jax.models import build_model
from ttt_jax.train.optim import decay_mask

from .test_ttt import random_inputs, rel_err, tree_rel_err

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ttt_jax"


@pytest.fixture
def registry():
  """Restores the registries after a test that registers toys."""
  saved = dict(mixers.MIXERS), dict(ttt_inner.INNER_MODELS)
  yield
  for live, old in zip((mixers.MIXERS, ttt_inner.INNER_MODELS), saved, strict=True):
    live.clear()
    live.update(old)


class PrefixMean(nnx.Module):
  """A toy mixer: y_t = W_o · mean_{s <= t} W_v x_s; streaming state (running sum, count)."""

  def __init__(self, cfg, *, compute_dtype, param_dtype, rngs):
    kw = dict(std=cfg.init_std, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.wv = linear(cfg.d_model, cfg.d_model, ("embed", "heads"), **kw)
    self.wo = linear(cfg.d_model, cfg.d_model, ("heads", "embed"), **kw)
    self.d_model = cfg.d_model

  def init_state(self, batch_size, capacity=None):
    return jnp.zeros((batch_size, self.d_model), jnp.float32), jnp.zeros((), jnp.float32)

  def __call__(self, x, positions, state=None, step=None):
    total, count = self.init_state(x.shape[0]) if state is None else state
    sums = total[:, None] + jnp.cumsum(self.wv(x).astype(jnp.float32), axis=1)
    counts = count + jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)
    y = self.wo((sums / counts[:, None]).astype(x.dtype))
    return y, None if state is None else (sums[:, -1], counts[-1])


def tiny_config(mixer: str, steps: int = 12):
  c = build_config("model=transformer,scale=tiny,ctx=32")
  m = c.model
  m.mixer, m.num_layers, m.d_model, m.num_heads, m.intermediate_size = mixer, 2, 32, 2, 64
  m.ttt.mini_batch_size = 8
  c.data.batch_size = 4
  c.train.steps, c.train.warmup_steps, c.train.lr = steps, 2, 3e-3
  return c


def streams_like_one_shot(cfg):
  model = build_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, toks, pos, cache: nnx.merge(graphdef, p)(toks, pos, cache))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  full, _ = run(params, tokens, jnp.arange(16, dtype=jnp.int32), None)
  cache, outs = model.init_cache(2, 16), []
  for t in range(0, 16, 4):
    logits, cache = run(params, tokens[:, t:t + 4], jnp.arange(t, t + 4, dtype=jnp.int32), cache)
    outs.append(logits)
  return float(jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - full)) / jnp.max(jnp.abs(full)))


# the toy models' loss falls by 0.3 in 20 steps with a margin (in 12, within 0.02 of it: the
# corpus, the running Python's standard library, differs between Python versions)
LEARN_STEPS = 20


def learns(config, train_steps):
  history, _ = train_steps(config, config.train.steps)
  losses = [h["loss"] for h in history]
  assert all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses  # starts near ln(259) = 5.56
  return history


def test_a_registered_toy_mixer_builds_streams_and_trains(registry, train_steps):
  mixers.register_mixer(mixers.MixerSpec("prefix_mean", PrefixMean))
  config = validate(tiny_config("prefix_mean", steps=LEARN_STEPS))
  assert isinstance(build_model(config.model, seed=0).blocks[0].mixer, mixers.SequenceMixer)
  assert streams_like_one_shot(config.model) <= 1e-5
  learns(config, train_steps)


def tanh_predict(params, z):
  return jnp.tanh(ttt_inner.mm(z, params["w"]) + params["b"])


TANH = ttt_inner.InnerModel(name="tanh", layers=(("w", "b"),), widths=lambda d: (d, d),
                            predict=tanh_predict)


def test_a_registered_toy_ttt_variant_builds_streams_and_trains(registry, train_steps):
  """Only `predict` given: the primal step is its automatic derivative, dual = primal."""
  spec = ttt_variants.register_ttt_variant(TANH)
  assert spec.name == "ttt_tanh" and "w" in spec.decayed
  config = validate(tiny_config("ttt_tanh", steps=LEARN_STEPS))
  model = build_model(config.model, seed=0)
  mixer = model.blocks[0].mixer
  assert mixer.kind == "tanh" and mixer.w.shape == (2, 16, 16) and mixer.b.shape == (2, 1, 16)
  mask = decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "ttt_tanh")
  assert mask["blocks"][0]["mixer"]["w"] and not mask["blocks"][0]["mixer"]["b"]
  assert streams_like_one_shot(config.model) <= 1e-5
  history = learns(config, train_steps)
  assert history[0]["ttt_lr_mult"] == 1.0  # the TTT metrics come with the registration
  with pytest.raises(ConfigError, match="model.ttt.mini_batch_size"):
    config.data.seq_len = 36
    validate(config)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_autodiff_primal_equals_the_written_primal(kind):
  """The default step of an inner model that brings only `predict`."""
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 2, 2, 4, 8, 4, seed=3)
  args = (params, ln, xq, xk, xv, ttt_inner.token_lr(gate, tau, 1.0, 8))  # one mini-batch
  model = ttt_inner.inner_model(kind)
  new_ref, z_ref = model.primal(*args)
  new, z = ttt_inner.autodiff_primal(model.predict)(*args)
  assert rel_err(z, z_ref) <= 1e-5
  assert tree_rel_err(new, new_ref) <= 1e-5


def test_unknown_mixer_fails_with_the_registered_names():
  config = tiny_config("conv")
  with pytest.raises(ConfigError, match="model.mixer='conv' not allowed; choose one of: full"):
    validate(config)


# -- no mixer-name branches outside the registrations ---------------------------------------------
REGISTRATIONS = {"layers/attention.py", "layers/ttt_variants.py", "layers/mixers.py"}
NOT_YET: set[str] = set()  # modules allowed to compare names for now (none)


def _mentions(node: ast.AST, words: tuple[str, ...]) -> bool:
  return any(isinstance(n, ast.Name) and n.id in words or isinstance(n, ast.Attribute)
             and n.attr in words for n in ast.walk(node))


def _names_in(node: ast.AST) -> set[str]:
  return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
          and isinstance(n.value, str)}


def variant_branches(source: str, mixer_names: set[str], inner_names: set[str]) -> list[int]:
  """Lines comparing a `mixer` value with a registered mixer name, or a `kind` value (the TTT
  layer's inner model) with an inner-model name."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      for words, names in ((("mixer",), mixer_names), (("kind",), inner_names)):
        if (any(_mentions(s, words) for s in sides)
            and any(_names_in(s) & names for s in sides)):
          lines.append(node.lineno)
          break
  return lines


def test_no_module_outside_the_registry_compares_mixer_names():
  names = set(mixers.MIXERS), set(ttt_inner.INNER_MODELS)
  assert names == ({"full", "swa", "ttt_linear", "ttt_mlp"}, {"linear", "mlp"})
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).as_posix()
    if rel not in REGISTRATIONS | NOT_YET:
      if lines := variant_branches(path.read_text(), *names):
        found[rel] = lines
  assert not found, f"compare a mixer name instead of asking the registry: {found}"


def test_the_branch_check_catches_branches():
  src = ("if cfg.mixer in ('ttt_linear', 'x'): pass\nif self.kind == 'linear': pass\n"
         "if m.mixer != 'swa': pass\nif tr.schedule == 'linear': pass\n"
         "if kind in ('transformer', 'swa'): pass\n")
  assert variant_branches(src, {"ttt_linear", "swa"}, {"linear"}) == [1, 2, 3]
