"""TTT-E2E: inner loop vs an unrolled reference, second-order outer gradient, streaming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config, validate
from ttt_jax.layers.mlp import InnerParam
from ttt_jax.models import abstract_model, build_model, count_params
from ttt_jax.models.lm import LanguageModel, token_nll

from ..repo_files import load_file
from ..tiers import core_and_extended

B, T, CHUNK, WINDOW, LR, CLIP = 2, 48, 16, 16, 3.0, 0.5
VOCAB = 259
# these tiny graphs run in milliseconds; XLA's backend optimisations would only slow compiling
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tiny_model_cfg(inner_lr=LR, clip=CLIP, layers=3, suffix=2):
  c = build_config("model=e2e,scale=tiny,ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = layers, 32, 2, 64
  m.window = WINDOW
  e = m.e2e
  e.prime_intermediate_size, e.suffix_len, e.mini_batch_size = 64, suffix, CHUNK
  e.inner_lr, e.inner_clip, e.ilr_init, e.ilr_warmup_steps = inner_lr, clip, 0.0, 0
  return m


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (B, T + 1), 0, VOCAB)


class Setup:
  """One tiny E2E model (3 blocks, 2 with prime MLPs) and its jitted inner-loop functions."""

  def __init__(self):
    self.model = build_model(tiny_model_cfg(), 0)
    self.graphdef, self.inner, self.outer = nnx.split(self.model, InnerParam, ...)

    def meta(inner, outer, seqs, lr, second_order=True):
      out = nnx.merge(self.graphdef, inner, outer).meta_forward(
          seqs[:, :-1], seqs[:, 1:], None, lr, second_order=second_order)
      return jnp.mean(out.losses), (out.losses, out.hidden, out.nll)

    self.meta = fast_jit(meta, static_argnums=4)
    self.grad = fast_jit(jax.value_and_grad(meta, (0, 1), has_aux=True), static_argnums=4)

  def logits(self, seqs, lr):
    """One-shot logits of seqs[:, :-1] through the training inner loop."""
    _, (_, hidden, _) = self.meta(self.inner, self.outer, seqs, jnp.float32(lr))
    return self.model.logits(hidden)[..., :VOCAB]


@pytest.fixture(scope="module")
def setup():
  return Setup()


def reference_chunk_losses(graphdef, inner, outer, seq, lr, clip, updates=None):  # noqa: PLR0913
  """One sequence [T+1]: the full LM streamed chunk by chunk (KV windows carried by the LM's own
  cache); between chunks the prime weights take one explicit, clipped SGD step on that chunk's
  loss, its gradient taken with the carried cache held fixed. `updates` (a list) collects the
  weights after every update."""
  lm = nnx.merge(graphdef, inner, outer)
  cache = LanguageModel.init_cache(lm, 1)
  w, losses = inner, []
  for i in range((seq.shape[0] - 1) // CHUNK):
    lo, hi = i * CHUNK, (i + 1) * CHUNK
    x, y, pos = seq[None, lo:hi], seq[None, lo + 1:hi + 1], jnp.arange(lo, hi)

    def chunk_loss(w, cache, x=x, y=y, pos=pos):
      logits, new_cache = LanguageModel.__call__(nnx.merge(graphdef, w, outer), x, pos, cache)
      return token_nll(logits, y), new_cache

    (loss, cache), g = jax.value_and_grad(chunk_loss, has_aux=True)(w, cache)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
    scale = jnp.minimum(1.0, clip / norm)
    w = jax.tree.map(lambda p, q, scale=scale: p - lr * scale * q, w, g)
    losses.append(loss)
    if updates is not None:
      updates.append(w)
  return jnp.stack(losses)


def test_inner_loop_matches_unrolled_reference(setup, tokens):
  graphdef, inner, outer = setup.graphdef, setup.inner, setup.outer

  def ref(inner, outer):  # every sequence on its own (vmap = a loop over the batch)
    one = lambda seq: reference_chunk_losses(graphdef, inner, outer, seq, LR, CLIP)  # noqa: E731
    losses = jax.vmap(one, out_axes=1)(tokens)  # [n, B]
    return jnp.mean(losses), losses

  (l_ref, c_ref), g_ref = fast_jit(jax.value_and_grad(ref, (0, 1), has_aux=True))(inner, outer)
  (l_our, (c_our, _, _)), g_our = setup.grad(inner, outer, tokens, jnp.float32(LR))
  assert rel_err(c_our, c_ref) < 1e-5
  for a, b in zip(jax.tree.leaves(g_our), jax.tree.leaves(g_ref), strict=True):
    assert rel_err(a, b) < 1e-5
  # compute_loss (meta mode) is the mean of the chunk losses
  loss, metrics = fast_jit(lambda b: setup.model.compute_loss(b, None))({"tokens": tokens})
  assert rel_err(loss, l_ref) < 1e-5
  assert rel_err(metrics["loss_last_chunk"], c_ref[-1].mean()) < 1e-5
  # the updates really change the later chunks
  no_lr = reference_chunk_losses(graphdef, inner, outer, tokens[0], 0.0, CLIP)
  assert rel_err(no_lr[1:], c_ref[1:, 0]) > 1e-4


def _direction(params, key, select):
  """A unit random direction in the leaves whose path satisfies `select` (zero elsewhere)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  keys = jax.random.split(key, len(flat))
  leaves = [jax.random.normal(k, x.shape) if select(jax.tree_util.keystr(p)) else jnp.zeros_like(x)
            for (p, x), k in zip(flat, keys, strict=True)]
  norm = jnp.sqrt(sum(jnp.sum(v * v) for v in leaves))
  return jax.tree.unflatten(jax.tree.structure(params), [v / norm for v in leaves])


def test_last_chunk_update_is_made_only_when_asked(setup, tokens):
  """Training skips the last chunk's update (it changes no loss): same losses, outputs and nll
  as with it; `final_update=True` returns every sequence's weights after all n updates, equal
  to the reference loop's, and the default returns none."""
  run = fast_jit(lambda inner, outer, final: nnx.merge(setup.graphdef, inner, outer).meta_forward(
      tokens[:, :-1], tokens[:, 1:], None, jnp.float32(LR), final_update=final),
      static_argnums=2)
  skip, full = run(setup.inner, setup.outer, False), run(setup.inner, setup.outer, True)
  for a, b in zip(skip[:3], full[:3], strict=True):
    assert rel_err(a, b) < 1e-6
  assert skip.inner is None
  for seq in range(B):
    updates = []
    reference_chunk_losses(setup.graphdef, setup.inner, setup.outer, tokens[seq], LR, CLIP,
                           updates)
    assert len(updates) == T // CHUNK
    for a, b in zip(jax.tree.leaves(full.inner), jax.tree.leaves(updates[-1]), strict=True):
      assert rel_err(a[seq], b) < 1e-5
    for a, b in zip(jax.tree.leaves(updates[-1]), jax.tree.leaves(updates[-2]), strict=True):
      assert rel_err(a, b) > 1e-6  # the last update is a real step


@pytest.mark.parametrize("part", ["prime", "attention"])
def test_outer_gradient_matches_finite_differences(setup, tokens, part):
  inner, outer, lr, eps = setup.inner, setup.outer, jnp.float32(1.0), 1e-2
  _, exact_g = setup.grad(inner, outer, tokens, lr)
  _, first_g = setup.grad(inner, outer, tokens, lr, False)
  for seed in range(2):
    key = jax.random.key(10 + seed)
    if part == "prime":
      u, which = _direction(inner, key, lambda p: True), 0
      shift = lambda s, u=u: (jax.tree.map(lambda a, b: a + s * b, inner, u), outer)  # noqa: E731
    else:  # the attention weights of the last (suffix) block
      u, which = _direction(outer, key, lambda p: "[2]['mixer']" in p), 1
      shift = lambda s, u=u: (inner, jax.tree.map(lambda a, b: a + s * b, outer, u))  # noqa: E731
    plus, _ = setup.meta(*shift(eps), tokens, lr)
    minus, _ = setup.meta(*shift(-eps), tokens, lr)
    fd = float((plus - minus) / (2 * eps))
    exact = float(tree_dot(exact_g[which], u))
    first = float(tree_dot(first_g[which], u))
    assert abs(exact - fd) < 0.02 * abs(fd), (exact, fd)
    # without the second-order path (stop_gradient on the update) the check fails
    assert abs(first - fd) > 0.1 * abs(fd), (first, fd)


def test_zero_inner_lr_is_sliding_window_attention(setup, tokens):
  swa_logits, _ = fast_jit(lambda t: LanguageModel.__call__(setup.model, t))(tokens[:, :-1])
  assert rel_err(setup.logits(tokens, 0.0), swa_logits[..., :VOCAB]) < 1e-5
  assert rel_err(setup.logits(tokens, LR), swa_logits[..., :VOCAB]) > 1e-3


def test_test_time_learning_uses_context_beyond_the_window(setup):
  doc = jax.random.randint(jax.random.key(7), (B, 3 * CHUNK), 0, VOCAB)
  seqs = jnp.concatenate([doc, doc, doc[:, :1]], axis=1)  # the copy starts 48 > window back
  later = slice(4 * CHUNK, 6 * CHUNK)  # second-copy chunks whose window lies inside the copy
  nll = {lr: setup.meta(setup.inner, setup.outer, seqs, jnp.float32(lr))[1][2]
         for lr in (0.0, 1.0)}
  assert float(nll[1.0][:, later].mean()) < float(nll[0.0][:, later].mean()) - 0.05
  assert float(nll[1.0][:, later].mean()) < float(nll[1.0][:, :3 * CHUNK].mean()) - 0.05


def _stream(model, tokens, sizes):
  step = fast_jit(lambda t, p, c: model(t, p, c))
  cache, outs, lo = model.init_cache(tokens.shape[0]), [], 0
  for n in sizes:
    out, cache = step(tokens[:, lo:lo + n], jnp.arange(lo, lo + n, dtype=jnp.int32), cache)
    outs.append(out)
    lo += n
  return jnp.concatenate(outs, axis=1)[..., :VOCAB]


def test_streaming_matches_one_shot(setup, tokens):
  one_shot = setup.logits(tokens, LR)
  x = tokens[:, :-1]
  for sizes in ([CHUNK] * (T // CHUNK), [5, 11, 16, 5, 11]):
    assert rel_err(_stream(setup.model, x, sizes), one_shot[:, :sum(sizes)]) < 1e-5, sizes
  direct, _ = fast_jit(lambda t: setup.model(t))(x)  # no cache: the one-shot path of __call__
  assert rel_err(direct[..., :VOCAB], one_shot) < 1e-5


def test_token_by_token_decoding_matches_one_shot(setup, tokens):
  one_shot = setup.logits(tokens, LR)
  assert rel_err(_stream(setup.model, tokens[:, :-1], [1] * T), one_shot) < 1e-5


# auto (the default) and remat_block (auto's choice for the inner loop from 125m at 4K) in make
# test, the others in make test-extended
@pytest.mark.parametrize("algorithm", core_and_extended(
    ("blocked", "blockwise", "auto", "remat_block"), ("auto", "remat_block")))
def test_streaming_matches_one_shot_on_every_attention_algorithm(setup, tokens, algorithm):
  """Streamed (chunks, odd segments, token by token) == the one-shot inner loop with dense
  attention, when attention runs query-blocked / online-softmax with blocks smaller than the
  chunk (the path b=1024 > 256 takes at every preset; `auto` with a 4-row block picks the
  blocked path for the chunk updates), or in the inner loop's rematerialised query blocks
  (`model.e2e.inner_attention_block`, on at the 125m+ presets)."""
  ref = setup.logits(tokens, LR)  # the setup model attends densely (blocks larger than inputs)
  cfg = tiny_model_cfg()
  if algorithm == "remat_block":
    cfg.e2e.inner_attention_block = 4
  else:
    cfg.attention_algorithm, cfg.attention_block, cfg.attention_flash_block = algorithm, 4, 8
  model = build_model(cfg, 0)
  x = tokens[:, :-1]
  # token by token, a 1-row query takes the dense path whatever the algorithm: once is enough
  patterns = [[CHUNK] * (T // CHUNK), [5, 11, 16, 5, 11]] + ([[1] * T] if algorithm == "blockwise"
                                                             else [])
  if algorithm == "remat_block":  # segments of whole 4-row blocks, with padded (-1) rows; one
    patterns.append([8, 12, 4, 8, 16])  # query: tests/layers/test_attention_remat.py
  for sizes in patterns:
    assert rel_err(_stream(model, x, sizes), ref[:, :sum(sizes)]) < 1e-5, sizes
  one_shot, _ = fast_jit(lambda t: model(t))(x)
  assert rel_err(one_shot[..., :VOCAB], ref) < 1e-5


def test_pretrain_mode_is_the_plain_lm_loss(tokens):
  """train_mode=pretrain: no inner update at all. Its loss and gradient equal the meta loss at
  inner LR 0 and differ from the meta loss at the real inner LR."""
  batch = {"tokens": tokens}
  models = {}
  for mode, lr in (("pretrain", LR), ("meta", 0.0), ("meta", LR)):
    cfg = tiny_model_cfg(inner_lr=lr, layers=2, suffix=1)
    cfg.e2e.train_mode = mode
    models[mode, lr] = build_model(cfg, 0)

  def loss_and_grad(model):
    graphdef, params = nnx.split(model)
    fn = lambda p: nnx.merge(graphdef, p).compute_loss(batch, jnp.int32(0))[0]  # noqa: E731
    return fast_jit(jax.value_and_grad(fn))(params)

  (pre, g_pre), (meta0, g_meta0), (meta, _) = (loss_and_grad(models[k]) for k in models)
  assert rel_err(pre, meta0) < 1e-6
  for a, b in zip(jax.tree.leaves(g_pre), jax.tree.leaves(g_meta0), strict=True):
    assert rel_err(a, b) < 1e-5
  assert abs(float(pre) - float(meta)) > 1e-3
  # and it is the plain forward pass of the same weights
  plain, _ = fast_jit(lambda t: models["pretrain", LR].forward(t))(tokens[:, :-1])
  assert rel_err(pre, token_nll(plain, tokens[:, 1:])) < 1e-6


@pytest.mark.parametrize("remat", [True, False])
def test_a_single_chunk_is_the_plain_lm_loss(remat):
  """T = b: one chunk, no update before it (the scan over the first n-1 chunks is empty), so the
  meta loss and gradients are the plain LM's (pretrain mode) with the same weights."""
  seqs = jax.random.randint(jax.random.key(2), (B, CHUNK + 1), 0, VOCAB)
  grads = {}
  for mode in ("meta", "pretrain"):
    cfg = tiny_model_cfg()
    cfg.e2e.train_mode, cfg.e2e.remat_chunks = mode, remat
    graphdef, params = nnx.split(build_model(cfg, 0))
    def fn(p, g=graphdef):
      return nnx.merge(g, p).compute_loss({"tokens": seqs}, jnp.int32(0))[0]
    grads[mode] = fast_jit(jax.value_and_grad(fn))(params)
  (meta, g_meta), (pre, g_pre) = grads["meta"], grads["pretrain"]
  assert rel_err(meta, pre) < 1e-6
  for a, b in zip(jax.tree.leaves(g_meta), jax.tree.leaves(g_pre), strict=True):
    assert rel_err(a, b) < 1e-5


@pytest.mark.extended  # the non-default model.e2e.remat_chunks settings
def test_chunk_remat_policy_changes_the_program_not_the_numbers(tokens):
  """model.e2e.remat_chunks / remat_chunks_policy: the same loss and gradients whether a chunk
  step is recomputed in full, keeps its matmul outputs ('dots': fewer FLOPs in the backward
  pass, more bytes kept) or is not rematerialised at all."""
  batch = {"tokens": tokens}
  results = {}
  for remat, policy in ((True, "full"), (True, "dots"), (False, "full")):
    cfg = tiny_model_cfg(layers=2, suffix=1)  # one suffix block: the chunk step is what varies
    cfg.e2e.remat_chunks, cfg.e2e.remat_chunks_policy = remat, policy
    graphdef, params = nnx.split(build_model(cfg, 0))
    fn = lambda p, g=graphdef: nnx.merge(g, p).compute_loss(batch, jnp.int32(0))[0]  # noqa: E731
    compiled = fast_jit(jax.value_and_grad(fn)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    results[remat, policy] = (compiled(params), cost["flops"],
                              compiled.memory_analysis().temp_size_in_bytes)
  (loss, grads), flops_full, temp_full = results[True, "full"]
  for key in ((True, "dots"), (False, "full")):
    (other_loss, other_grads), _, _ = results[key]
    assert rel_err(other_loss, loss) < 1e-6
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
      assert rel_err(a, b) < 1e-5
  _, flops_dots, temp_dots = results[True, "dots"]
  assert flops_dots < 0.97 * flops_full  # the matmuls are not recomputed
  assert temp_dots > temp_full  # their outputs are kept instead


def test_suffix_remat_resolves_and_changes_the_work_not_the_numbers():
  """model.e2e.suffix_remat: 'auto' leaves the suffix blocks un-rematerialised inside chunk
  steps that are (remat_chunks), else takes model.remat; an explicit policy is taken as it is.
  Under model.remat=full the nested block remat ('full') gives the same loss and gradients as
  'auto' with more matmul FLOPs (every loop trip counted in the compiled program)."""
  from ttt_jax.benchmarks.hlo_text import census  # noqa: PLC0415
  from ttt_jax.models.config import model_config  # noqa: PLC0415
  from ttt_jax.models.e2e import suffix_remat  # noqa: PLC0415

  cfg = tiny_model_cfg(layers=2, suffix=1)
  cfg.remat = "full"
  resolved = {}
  for chunks, setting in ((True, "auto"), (False, "auto"), (True, "dots"), (False, "none")):
    cfg.e2e.remat_chunks, cfg.e2e.suffix_remat = chunks, setting
    resolved[chunks, setting] = suffix_remat(model_config(cfg))
  assert resolved == {(True, "auto"): "none", (False, "auto"): "full", (True, "dots"): "dots",
                      (False, "none"): "none"}
  batch = {"tokens": jax.random.randint(jax.random.key(23), (B, T + 1), 0, VOCAB)}
  results = {}
  cfg.e2e.remat_chunks = True
  for setting in ("auto", "full"):
    cfg.e2e.suffix_remat = setting
    graphdef, params = nnx.split(build_model(cfg, 5))
    fn = lambda p, g=graphdef: nnx.merge(g, p).compute_loss(batch, jnp.int32(0))[0]  # noqa: E731
    compiled = fast_jit(jax.value_and_grad(fn)).lower(params).compile()
    results[setting] = compiled(params), census(compiled.as_text())["matmul_flops"]
  (loss, grads), flops_auto = results["auto"]
  (loss_full, grads_full), flops_full = results["full"]
  assert rel_err(loss_full, loss) < 1e-6
  for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads), strict=True):
    assert rel_err(a, b) < 1e-5
  assert flops_auto < 0.95 * flops_full  # the suffix block is not recomputed a second time


@pytest.mark.parametrize("layers,suffix",
                         [pytest.param(3, 2, marks=pytest.mark.extended), (2, 1), (2, 2)])
def test_first_suffix_attention_runs_once_outside_the_loop(layers, suffix):
  """model.e2e.hoist_first_attention (default): meta_forward runs the first suffix block's
  attention over the whole sequence (its input, the prefix output, does not depend on the inner
  weights) before the chunk loop; False keeps it in the loop with a carried KV window. Same
  losses and gradients, with a prefix, with one suffix block (the loop then carries no window)
  and with no prefix block; the hoisted loop carries the other suffix blocks' windows only (its
  runner refuses one window more and partial chunks) and launches less work per trip."""
  from ttt_jax.benchmarks.hlo_text import census  # noqa: PLC0415

  seqs = jax.random.randint(jax.random.key(31), (B, T + 1), 0, VOCAB)
  out = {}
  for hoist in (True, False):
    cfg = tiny_model_cfg(layers=layers, suffix=suffix)
    cfg.e2e.hoist_first_attention = hoist
    graphdef, params = nnx.split(build_model(cfg, 3))
    fn = lambda p, g=graphdef: jnp.mean(nnx.merge(g, p).meta_forward(  # noqa: E731
        seqs[:, :-1], seqs[:, 1:], None, jnp.float32(LR)).losses)
    compiled = fast_jit(jax.value_and_grad(fn)).lower(params).compile()
    loops = census(compiled.as_text())["loops"]
    out[hoist] = compiled(params), sum(x["per_trip"] * x["trips"] for x in loops), graphdef
  (loss, grads), in_loops, graphdef = out[True]
  (ref_loss, ref_grads), ref_in_loops, _ = out[False]
  assert rel_err(loss, ref_loss) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    assert rel_err(a, b) < 1e-5
  assert in_loops < ref_in_loops  # less work inside the chunk loops
  model = nnx.merge(graphdef, params)
  runner, inner, outer = model.split_inner(mixed_first=True)
  one = inner  # unbatched: one sequence's weights
  kv = model.suffix_blocks()[-1].mixer.init_state(1)
  window = type(kv)(kv.k[0], kv.v[0], kv.pos)  # one sequence's window
  windows = [window] * (suffix - 1)
  x = jax.random.normal(jax.random.key(32), (CHUNK, 32))
  h, new = runner.hidden(one, outer, x, jnp.arange(CHUNK), windows)
  assert h.shape == x.shape and len(new) == suffix - 1  # the other suffix blocks' windows
  with pytest.raises(ValueError):
    runner.hidden(one, outer, x, jnp.arange(CHUNK), [*windows, window])
  with pytest.raises(ValueError, match="whole chunks only"):
    runner.hidden(one, outer, x, jnp.arange(CHUNK), windows, valid=3)


def test_tiny_e2e_meta_trains_on_the_embedded_corpus(train_steps):
  c = build_config("model=e2e,scale=tiny,ctx=64,mode=meta")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.window = 2, 32, 2, 64, 32
  m.e2e.prime_intermediate_size, m.e2e.mini_batch_size, m.e2e.ilr_warmup_steps = 64, 16, 10
  c.data.batch_size = 4
  c.train.steps, c.train.warmup_steps, c.train.lr = 30, 3, 1e-2
  history, _ = train_steps(c, c.train.steps)
  assert history[0]["inner_lr"] < history[-1]["inner_lr"] == m.e2e.inner_lr  # warmup
  first = np.mean([h["loss"] for h in history[:3]])
  last = np.mean([h["loss"] for h in history[-3:]])
  assert last < first - 1.0, (first, last)
  assert all(np.isfinite(h["grad_norm"]) for h in history)


def test_experiment_grid_configs_build():
  grid = load_file("configs/e2e.py")
  for scale in ("tiny", "125m", "350m", "760m", "1b", "3b"):
    for stage in grid.STAGES:
      c = validate(grid.get_config(f"scale={scale},stage={stage},from=/tmp/run"))
      assert c.checkpoint.load_part == "params" and c.model.kind == "e2e"
  c = grid.get_config("scale=3b,stage=ext128k")
  assert (c.data.seq_len, c.data.batch_size, c.model.e2e.suffix_len) == (131072, 16, 8)
  assert c.model.intermediate_size == 5632 and c.model.e2e.mini_batch_size == 1024
  e2e, full = (grid.get_config(f"scale=125m,model={k}").model for k in ("e2e", "transformer"))
  assert (e2e.intermediate_size, full.intermediate_size, e2e.e2e.suffix_len) == (1664, 2048, 3)
  n_e2e, n_full = (count_params(nnx.to_pure_dict(abstract_model(m)[1])) for m in (e2e, full))
  assert abs(n_e2e / n_full - 1) < 0.02


def test_streaming_call_that_does_not_continue_the_stream_fails(setup, tokens):
  """The cache's invariants are checked in one place: a call must start where the stream
  stopped, with contiguous positions (before, a gap or a replay gave silently wrong logits)."""
  x = tokens[:, :-1]
  step = fast_jit(lambda t, p, c: setup.model(t, p, c))
  _, cache = step(x[:, :5], jnp.arange(5, dtype=jnp.int32), setup.model.init_cache(B))
  for pos, needle in ((jnp.arange(6, 11), "continue at position 5"),
                      (jnp.arange(0, 5), "continue at position 5"),
                      (jnp.array([5, 6, 8, 9, 10]), "contiguous")):
    with pytest.raises(Exception, match=needle):
      out, _ = step(x[:, 5:10], pos.astype(jnp.int32), cache)
      jax.block_until_ready(out)
  out, _ = step(x[:, 5:10], jnp.arange(5, 10, dtype=jnp.int32), cache)  # the right call works
  assert np.isfinite(np.asarray(out)).all()
