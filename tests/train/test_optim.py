"""Optimizer: weight decay reaches exactly the weight matrices, for every model kind and layout;
the global norm and the clipping by it equal optax's."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.layers import mixers
from ttt_jax.models import abstract_model
from ttt_jax.train.optim import clip_by_global_norm, decay_mask, global_norm, make_optimizer

# The rule, written out by full path ("blocks/<i>/" without scan_layers, "blocks/" with it;
# E2E's suffix blocks "suffix/<i>/" when its prefix is stacked).
# Every parameter must match exactly one pattern: a new parameter fails this test until it is
# classified here.
_BLOCK = r"(blocks|suffix)/(\d+/)?"
DECAYED = [  # weight matrices
    _BLOCK + r"mixer/(wq|wk|wv|wo|wg)/kernel",  # attention / TTT projections
    _BLOCK + r"(mlp|prime_mlp)/(w1|w2|w3)",  # SwiGLU and E2E prime MLPs
    _BLOCK + r"(conv|mixer/conv_q|mixer/conv_k)/kernel",  # depthwise causal convs
    _BLOCK + r"mixer/(w|w1|w2)",  # TTT initial inner weight matrices W0 (outer parameters)
    r"head",  # untied output projection
]
NOT_DECAYED = [
    r"embed/embedding",  # token embedding (also the head when tied)
    _BLOCK + r"(conv_norm|mixer_norm|mixer_post_norm|prime_norm|prime_post_norm|mlp_norm"
             r"|mlp_post_norm)/scale",  # block RMSNorms
    _BLOCK + r"mixer/(q_norm|k_norm)/scale",  # qk-norm
    r"final_norm/scale",
    _BLOCK + r"mixer/(ln_scale|ln_bias|post_scale|post_bias)",  # TTT inner LN and output LN
    _BLOCK + r"(conv|mixer/conv_q|mixer/conv_k)/bias",  # conv biases
    _BLOCK + r"mixer/(b|b1|b2)",  # TTT inner biases
    _BLOCK + r"mixer/(lr_w|lr_b|tau)",  # learnable inner LR: gate weights/bias, tau
]

CASES = [(kind, backbone, scan)
         for kind, backbone in [("transformer", None), ("swa", None), ("ttt_linear", "mamba"),
                                ("ttt_linear", "base"), ("ttt_mlp", "mamba"),
                                ("ttt_mlp", "base"), ("e2e", None)]
         for scan in (False, True)]


def model_config(kind, backbone, scan, tie=False):
  c = build_config(f"model={kind},scale=tiny").model
  c.scan_layers, c.tie_embeddings = scan, tie
  if backbone is not None:
    c.ttt.backbone = backbone
  return c


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def expected_decay(path: str) -> bool:
  hits = [p for p in DECAYED if re.fullmatch(p, path)]
  misses = [p for p in NOT_DECAYED if re.fullmatch(p, path)]
  assert len(hits) + len(misses) == 1, f"{path}: matches {hits + misses} (need exactly one)"
  return bool(hits)


def abstract_params(cfg):
  _, state = abstract_model(cfg)
  return nnx.to_pure_dict(state)


def leaves_by_path(tree) -> dict:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("kind,backbone,scan", CASES)
def test_decay_mask_is_exactly_the_weight_matrices(kind, backbone, scan):
  cfg = model_config(kind, backbone, scan)
  params = abstract_params(cfg)
  shapes = leaves_by_path(params)
  mask = leaves_by_path(decay_mask(params, cfg.mixer))
  assert mask.keys() == shapes.keys()
  wrong = {p: m for p, m in mask.items() if m != expected_decay(p)}
  assert not wrong, f"decay mask disagrees with the rule at {wrong}"
  # The rule is not an ndim rule in disguise: matrices-shaped leaves that must stay undecayed
  # exist in every model (the embedding; stacked norm scales; TTT per-head norms and biases).
  assert any(not m and shapes[p].ndim >= 2 for p, m in mask.items())
  if scan:
    assert not mask["blocks/mixer_norm/scale"] and shapes["blocks/mixer_norm/scale"].ndim == 2
  if kind.startswith("ttt"):
    n = "blocks/mixer/" if scan else "blocks/0/mixer/"
    assert not any(mask[n + k] for k in ("ln_scale", "ln_bias", "lr_w", "lr_b", "tau"))
    assert mask[n + ("w" if kind == "ttt_linear" else "w2")]


def test_tied_embeddings_stay_undecayed():
  mask = leaves_by_path(decay_mask(abstract_params(model_config("transformer", None, False,
                                                                 tie=True)), "full"))
  assert "head" not in mask and not mask["embed/embedding"]


def nonzero_params(cfg, seed=0):
  """Parameters with every entry away from zero (so decay would move each one)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(1.0 + rng.uniform(0.1, 1.0, s.shape), s.dtype),
                      abstract_params(cfg))


@pytest.mark.parametrize("kind,backbone,scan", [("ttt_mlp", "mamba", True),
                                                ("ttt_linear", "base", False),
                                                ("e2e", None, False)])
def test_zero_gradient_step_moves_only_decayed_leaves(kind, backbone, scan):
  """lr > 0, zero gradients, weight_decay > 0: Adam's moment terms are 0, so an update is
  pure decay, -lr * wd * p on decayed leaves and exactly nothing elsewhere."""
  tr = build_config(f"model={kind},scale=tiny").train
  tr.lr, tr.warmup_steps, tr.schedule, tr.weight_decay = 1e-2, 0, "constant", 0.1
  cfg = model_config(kind, backbone, scan)
  params = nonzero_params(cfg)
  opt = make_optimizer(tr, cfg.mixer)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  new = leaves_by_path(optax.apply_updates(params, updates))
  old = leaves_by_path(params)
  moved = {p for p in old if not np.array_equal(np.asarray(new[p]), np.asarray(old[p]))}
  decayed = {p for p in old if expected_decay(p)}
  assert moved == decayed
  for p in decayed:
    np.testing.assert_allclose(np.asarray(new[p]), np.asarray(old[p]) * (1 - 1e-2 * 0.1),
                               rtol=1e-6)


def test_only_the_models_own_mixer_decides_its_names():
  """A name another registered mixer decays (here a toy declaring `tau`, which TTT-Linear has
  as its undecayed LR offset) leaves a TTT-Linear model's mask and updates as they were."""
  params = abstract_params(model_config("ttt_linear", "mamba", False))
  before = leaves_by_path(decay_mask(params, "ttt_linear"))
  saved = dict(mixers.MIXERS)
  try:
    mixers.register_mixer(mixers.MixerSpec("toy_tau", mixers.MIXERS["full"].build,
                                           decayed=frozenset({"kernel", "tau"})))
    after = leaves_by_path(decay_mask(params, "ttt_linear"))
    assert after == before and not after["blocks/0/mixer/tau"]
    assert leaves_by_path(decay_mask(params, "toy_tau"))["blocks/0/mixer/tau"]
  finally:
    mixers.MIXERS.clear()
    mixers.MIXERS.update(saved)


def random_tree(seed: int) -> dict:
  """Leaves of every rank the models have (scalar, vector, matrix, per-head [H, 1, d], stacked
  [L, ...]) and both dtypes, fresh random values."""
  rng = np.random.default_rng(seed)
  shapes = {"s": (), "v": (7,), "m": (5, 9), "h": (3, 1, 4), "l": (2, 3, 5, 6)}
  tree = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  tree["bf"] = jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16)
  return tree


def test_global_norm_equals_optax_norm_and_takes_one_reduction_per_leaf():
  tree = random_tree(0)
  want = float(optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree)))
  got = global_norm(tree)
  assert got.dtype == jnp.float32 and abs(float(got) - want) <= 1e-6 * want
  assert float(global_norm({})) == 0.0
  # one reduction per leaf of rank >= 2 (to one value per first-axis index), one for all,
  # the total behind the barrier that keeps XLA from splitting it per leaf again
  eqns = jax.make_jaxpr(global_norm)(tree).jaxpr.eqns
  names = [e.primitive.name for e in eqns]
  assert names.count("reduce_sum") == 1 + sum(x.ndim > 1 for x in tree.values())
  assert names.count("optimization_barrier") == 1
  assert names.index("optimization_barrier") < len(names) - 1 - names[::-1].index("reduce_sum")
  # for leaves split over devices: a scalar sum per leaf, added up (XLA combines their
  # all-reduces), no barrier; the same norm
  scalars = global_norm(tree, rows=False)
  assert abs(float(scalars) - want) <= 1e-6 * want and float(global_norm({}, rows=False)) == 0
  eqns = jax.make_jaxpr(lambda t: global_norm(t, rows=False))(tree).jaxpr.eqns
  sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
  assert len(sums) == len(tree)
  assert all(len(e.params["axes"]) == e.invars[0].aval.ndim for e in sums)
  assert "optimization_barrier" not in [e.primitive.name for e in eqns]


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_equals_optax(max_norm):
  """Clipped (norm above max_norm) and left alone (below): optax's updates (of the leaves in
  fp32: optax squares a bf16 leaf in bf16), each in its leaf's dtype, and optax's empty state,
  so checkpoints keep their optimizer-state tree."""
  tree = random_tree(1)
  ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
  state = ours.init(tree)
  assert jax.tree.structure(state) == jax.tree.structure(theirs.init(tree))
  got, _ = ours.update(tree, state)
  want, _ = theirs.update(jax.tree.map(lambda x: x.astype(jnp.float32), tree), state)
  for key in tree:
    a, b = got[key], want[key]
    assert a.dtype == tree[key].dtype
    rounding = 8e-3 if key == "bf" else 1e-6  # the bf16 leaf: its own rounding of the result
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b)).max() <= rounding * np.abs(b).max()
  changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree), strict=True))
  assert changed == (max_norm == 0.5)
