"""TTT-E2E with its prefix blocks stacked and scanned (`model.scan_layers=True`): the prefix is one
block with a leading `layers` axis applied by `jax.lax.scan`, the suffix blocks (prime MLPs)
stay apart under `suffix`. With the same weights it computes what the list of blocks computes:
the meta-learning loss and its second-order gradient, the pretrain-mode loss, streaming (its
prefix cache one stacked cache) and token-by-token decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.models import build_model

from .test_e2e import CHUNK, LR, VOCAB, T, _stream, fast_jit, rel_err, tiny_model_cfg

LAYERS, SUFFIX = 5, 2  # three prefix blocks to stack (not the batch of 2: axes stay apart)


def model_pair(**e2e):
  """(list model, stacked model) with the same weights: the list's prefix blocks stacked."""
  cfgs = []
  for scan in (False, True):
    cfg = tiny_model_cfg(layers=LAYERS, suffix=SUFFIX)
    cfg.scan_layers = scan
    for key, value in e2e.items():
      setattr(cfg.e2e, key, value) if hasattr(cfg.e2e, key) else setattr(cfg, key, value)
    cfgs.append(cfg)
  plain, scanned = build_model(cfgs[0], 0), build_model(cfgs[1], 1)
  graphdef, state = nnx.split(scanned)
  nnx.replace_by_pure_dict(state, stacked(nnx.to_pure_dict(nnx.state(plain))))
  return plain, nnx.merge(graphdef, state)


def stacked(tree: dict) -> dict:
  """A list model's parameters (or gradients) in the stacked layout."""
  n = LAYERS - SUFFIX
  blocks = tree["blocks"]
  return dict(tree, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in range(n))),
              suffix={j: blocks[n + j] for j in range(SUFFIX)})


def loss_and_grads(model, batch):
  graphdef, params = nnx.split(model)
  fn = lambda p: nnx.merge(graphdef, p).compute_loss(batch, jnp.int32(0))[0]  # noqa: E731
  loss, grads = fast_jit(jax.value_and_grad(fn))(params)
  return loss, nnx.to_pure_dict(grads)


def assert_grads_close(got: dict, want: dict) -> None:
  """Every leaf of `got` within 1e-5 relative of the leaf at the same path in `want`."""
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = want
    for k in path:
      b = b[k.key]
    assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(3), (2, T + 1), 0, VOCAB)


def test_the_stacked_layout():
  plain, scanned = model_pair()
  params = nnx.to_pure_dict(nnx.state(scanned))
  assert sorted(params["suffix"]) == list(range(SUFFIX))
  assert all(x.shape[0] == LAYERS - SUFFIX for x in jax.tree.leaves(params["blocks"]))
  assert "prime_mlp" in params["suffix"][0] and "prime_mlp" not in params["blocks"]
  # the same number of weights, and the list's prefix blocks are the stack's rows
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(
      x.size for x in jax.tree.leaves(nnx.state(plain)))
  cache = scanned.init_cache(2)
  window, heads = plain.init_cache(2).prefix[0].k.shape[1:3]
  assert cache.prefix.k.shape == (LAYERS - SUFFIX, 2, window, heads, 32 // heads)  # stacked
  assert len(plain.init_cache(2).prefix) == LAYERS - SUFFIX


@pytest.mark.parametrize("remat,hoist",
                         [("none", True), pytest.param("full", False, marks=pytest.mark.extended)])
def test_meta_loss_and_second_order_grads_equal_the_list_of_blocks(tokens, remat, hoist):
  plain, scanned = model_pair(remat=remat, hoist_first_attention=hoist)
  (l1, g1), (l2, g2) = (loss_and_grads(m, {"tokens": tokens}) for m in (plain, scanned))
  assert rel_err(l2, l1) < 1e-6
  assert_grads_close(g2, stacked(g1))
  assert float(jnp.abs(g2["blocks"]["mlp"]["w1"]).max()) > 0  # the stack is trained


def test_pretrain_mode_equals_the_list_of_blocks(tokens):
  plain, scanned = model_pair(train_mode="pretrain")
  (l1, g1), (l2, g2) = (loss_and_grads(m, {"tokens": tokens}) for m in (plain, scanned))
  assert rel_err(l2, l1) < 1e-6
  assert_grads_close(g2, stacked(g1))


def test_streaming_and_decoding_equal_the_list_of_blocks(tokens):
  plain, scanned = model_pair()
  x = tokens[:, :-1]
  one_shot, _ = fast_jit(lambda t: plain(t))(x)
  one_shot = one_shot[..., :VOCAB]
  scanned_one_shot, _ = fast_jit(lambda t: scanned(t))(x)
  assert rel_err(scanned_one_shot[..., :VOCAB], one_shot) < 1e-5
  for sizes in ([CHUNK] * (T // CHUNK), [5, 11, 16, 5, 11], [1] * 20):
    got = _stream(scanned, x, sizes)
    assert rel_err(got, one_shot[:, :sum(sizes)]) < 1e-5, sizes
  assert LR > 0  # the inner loop learns in these streams (tiny_model_cfg's inner LR)


def test_config_needs_a_prefix_to_stack():
  c = build_config("model=e2e,scale=tiny")
  c.model.scan_layers = True
  validate(c)
  c.model.e2e.suffix_len = c.model.num_layers
  top = c.model.num_layers - 1
  with pytest.raises(ConfigError, match=rf"suffix_len={top + 1} must be in \[1, {top}\] "
                     rf"\(model.num_layers={top + 1}; model.scan_layers=True stacks a prefix"):
    validate(c)
  with pytest.raises(ValueError, match="stacks its prefix blocks: needs model.e2e.suffix_len"):
    build_model(c.model)  # a model built without validation says so too
  c.model.scan_layers, c.model.e2e.suffix_len = False, top + 2  # unstacked: up to every block
  with pytest.raises(ConfigError, match=rf"suffix_len={top + 2} must be in \[1, {top + 1}\] "
                     rf"\(model.num_layers={top + 1}\)$"):
    validate(c)


def test_streaming_runs_through_stream_not_run_blocks():
  _, scanned = model_pair()
  h = jnp.asarray(np.zeros((1, CHUNK, 32)), jnp.float32) + 0.1
  pos = jnp.arange(CHUNK, dtype=jnp.int32)
  with pytest.raises(ValueError, match="E2EModel.stream streams"):
    scanned.run_blocks(h, pos, cache=scanned.init_cache(1).prefix)
