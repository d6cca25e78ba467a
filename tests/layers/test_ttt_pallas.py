"""The Pallas TTT kernels (interpret mode on CPU) against the primal form, which shares no code
with them: outputs, final inner weights and gradients w.r.t. every input (both backward kernels
are written by hand, so this is what checks them; TTT-MLP's over one block of the hidden layer
and over four, with an odd and an even number of mini-batches);
launch counts; the mixer with model.ttt.impl=pallas; the start-up checks. Their CUDA lowering:
tests/test_gpu_lowering.py; their H200 build: tests/test_gpu_census.py."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.benchmarks import lowering
from ttt_jax.benchmarks.presets import load_preset, preset_spec
from ttt_jax.config import SCALES, ConfigError
from ttt_jax.layers import (
  common,
  ttt_inner,
  ttt_pallas,
  ttt_pallas_linear,
  ttt_pallas_mlp,
  ttt_variants,
)
from ttt_jax.layers.common import building_for
from ttt_jax.layers.ttt import TTTMixer
from ttt_jax.models.config import model_config

from .test_ttt import mixer_cfg, random_inputs, randomize, rel_err, tree_rel_err

BASE_LR = {"linear": 1.0, "mlp": 0.1}
B = 16  # the kernels' smallest mini-batch (Triton: dims >= 16)


def sequence_fn(kind: str, impl: str, complete=None):
  """(params, ln, xq, xk, xv, eta) [n, B, H, b, ...] -> (final params, outputs); `complete`
  [n] bool (streaming): the mini-batches whose update is made."""
  if impl == "primal":
    step = ttt_inner.inner_model(kind).step("primal")
    return lambda p, ln, *xs: ttt_inner.scan_minibatches(step, p, ln, xs, 0, complete)
  kernels = {"linear": ttt_pallas_linear.linear_sequence,
             "mlp": ttt_pallas_mlp.mlp_sequence}[kind]
  return lambda *a: kernels(*a, complete, interpret=True)


def inputs(kind, n=3, seed=3, d=16):
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 2, 2, n * B, d, B, seed=seed)
  bsz, h, length, d = xq.shape
  to_mb = lambda a: jnp.moveaxis(a.reshape(bsz, h, n, B, *a.shape[3:]), 2, 0)  # noqa: E731
  eta = ttt_inner.token_lr(to_mb(gate), tau, BASE_LR[kind], d)
  rng = np.random.default_rng(seed + 1)  # each sequence its own initial inner weights, so a
  params = jax.tree.map(  # kernel reading another sequence's would show in the values
      lambda p: p + jnp.asarray(0.05 * rng.standard_normal(p.shape), jnp.float32), params)
  return params, ln, to_mb(xq), to_mb(xk), to_mb(xv), eta


# `complete` (a streaming call): the last mini-batches' updates left out, as for a partial one
# head dim 16 (TTT-MLP's hidden layer 64 wide), or 24, 20 and 80, which the kernels run padded
# to 32, 32 and 128 (at 20, TTT-MLP's hidden width 80 runs as 96: three 32-unit blocks, or as one
# block of 128 at mlp_block 128)
@pytest.mark.parametrize("kind,n,tune,complete,d", [
    ("linear", 3, {}, None, 16), ("linear", 3, {"linear_output": "xla"}, None, 16),
    ("mlp", 3, {"mlp_block": 64}, None, 16), ("mlp", 2, {"mlp_block": 16}, None, 16),
    ("linear", 3, {}, (True, True, False), 16),
    ("linear", 3, {}, None, 24), ("mlp", 2, {"mlp_block": 32}, None, 24),
    ("mlp", 2, {"mlp_block": 32}, None, 20), ("linear", 3, {}, (True, False, False), 24),
    pytest.param("mlp", 2, {"mlp_block": 128}, None, 20, marks=pytest.mark.extended),
    pytest.param("linear", 3, {"linear_output": "xla"}, None, 24, marks=pytest.mark.extended),
    pytest.param("linear", 2, {}, None, 80, marks=pytest.mark.extended),  # 3b's, run as 128
    pytest.param("linear", 3, {"linear_output": "xla"}, (True, False, False), 16,
                 marks=pytest.mark.extended),
    pytest.param("mlp", 3, {"mlp_block": 64}, (True, False, False), 16,
                 marks=pytest.mark.extended),
    pytest.param("mlp", 3, {"mlp_block": 16, "mlp_unroll": True}, None, 16,
                 marks=pytest.mark.extended)],
    ids=["linear", "linear-output-xla", "mlp-1block-odd", "mlp-4blocks-even", "linear-streaming",
         "linear-padded", "mlp-padded", "mlp-padded-hidden", "linear-padded-streaming",
         "mlp-padded-one-block", "linear-output-xla-padded", "linear-hd80",
         "linear-output-xla-streaming", "mlp-streaming", "mlp-4blocks-unrolled"])
def test_kernels_equal_primal_values_and_grads(kind, n, tune, complete, d):
  args = inputs(kind, n=n, d=d)
  probe = jnp.asarray(np.random.default_rng(5).standard_normal(args[2].shape), jnp.float32)
  complete = None if complete is None else jnp.asarray(complete)
  res = {}
  for impl in ("primal", "pallas"):
    fn = sequence_fn(kind, impl, complete)

    def objective(*a, fn=fn):
      final, z = fn(*a)
      value = jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))
      return value, (final, z)

    grad_fn = jax.value_and_grad(objective, argnums=tuple(range(6)), has_aux=True)
    with ttt_pallas.tuning(**tune):
      res[impl] = jax.jit(grad_fn)(*args)
  (_, (final_r, z_r)), g_r = res["primal"]
  (_, (final_p, z_p)), g_p = res["pallas"]
  assert rel_err(z_p, z_r) <= 2e-5
  assert tree_rel_err(final_p, final_r) <= 2e-5
  assert tree_rel_err(g_p, g_r) <= 2e-5
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_p))


def test_linear_output_sets_where_z_is_made():
  """`Tuning.linear_output`: 'kernel' makes z in the sequential kernels (which take XQ and A);
  'xla' leaves them the W chain (XK, labels and LRs only) and makes z with batched XLA
  matmuls over the stored W_i."""
  args = inputs("linear", n=2)

  def kernels(where):  # the kernels a GPU compiles for the forward and backward
    def loss(*a):
      return jnp.sum(ttt_pallas_linear.linear_sequence(*a)[1])

    with ttt_pallas.tuning(linear_output=where):
      text = lowering.export_cuda(jax.grad(loss, argnums=(0, 2)), *args).mlir_module()
    return sorted(set(re.findall(r'name = "(_\w+_kernel)"', text)))

  assert kernels("kernel") == ["_linear_bwd_kernel", "_linear_fwd_kernel"]
  assert kernels("xla") == ["_chain_bwd_kernel", "_chain_fwd_kernel"]
  with pytest.raises(ValueError, match="Tuning.linear_output='both'"):
    kernels("both")


@pytest.mark.parametrize("kind,where", [("linear", "kernel"), ("linear", "xla"), ("mlp", "kernel")])
def test_one_launch_each_way(kind, where):
  args = inputs(kind, n=2)
  fwd = sequence_fn(kind, "pallas")
  loss = lambda *a: jnp.sum(fwd(*a)[1])  # noqa: E731
  with ttt_pallas.tuning(linear_output=where):
    assert str(jax.make_jaxpr(fwd)(*args)).count("pallas_call") == 1
    assert str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(*args)).count("pallas_call") == 2


def _dot_precisions(fn, *args) -> set[str]:
  """The precisions of every dot in the program, the kernel bodies' included."""
  return set(re.findall(r"precision=(\w+|\(Precision\.\w+)", str(jax.make_jaxpr(fn)(*args))))


def test_kernel_dots_take_the_callers_precision():
  """Like XLA's dual form: `jax.default_matmul_precision` reaches the kernel bodies' dots
  (Triton: HIGHEST -> IEEE fp32, HIGH or DEFAULT -> TF32)."""
  args = inputs("linear", n=2)
  for context, want in (("tensorfloat32", "(Precision.HIGH"), ("highest", "(Precision.HIGHEST")):
    fwd = lambda *a: sequence_fn("linear", "pallas")(*a)  # noqa: E731  (a new trace)
    with jax.default_matmul_precision(context):
      assert _dot_precisions(fwd, *args) == {want}, context


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_tuning_sets_the_launch_parameters_while_tracing(kind):
  """Both kernels (forward and backward) of each inner model; TTT-MLP's take `mlp_num_warps`
  and always one pipeline stage (they read what the previous mini-batch wrote)."""
  args = inputs(kind, n=2)

  def launch(**tune):
    loss = lambda *a: jnp.sum(sequence_fn(kind, "pallas")(*a)[1])  # noqa: E731  (a new trace)
    with ttt_pallas.tuning(**tune):
      text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(*args))
    return re.findall(r"num_warps=(\d+), num_stages=(\d+)", text)

  default = ttt_pallas.current_tuning()
  assert default == ttt_pallas.Tuning()
  if kind == "linear":
    assert launch() == [(str(default.num_warps), str(default.num_stages))] * 2
    assert launch(num_warps=2, num_stages=3) == [("2", "3")] * 2
  else:
    assert launch() == [(str(default.mlp_num_warps), "1")] * 2
    assert launch(mlp_num_warps=2, num_warps=16, num_stages=3) == [("2", "1")] * 2
  assert ttt_pallas.current_tuning() == ttt_pallas.Tuning()  # restored after the block


def test_mlp_block_sets_the_hidden_blocks():
  """`Tuning.mlp_block` hidden units per block; the whole hidden layer where it is narrower."""
  def starts(hidden, **tune):
    with ttt_pallas.tuning(**tune):
      return [(w.start, w.size) for w in ttt_pallas_mlp.hidden_blocks(hidden)]

  assert starts(256) == [(0, 32), (32, 32), (64, 32), (96, 32), (128, 32), (160, 32), (192, 32),
                         (224, 32)]  # the default, 32
  assert starts(256, mlp_block=128) == [(0, 128), (128, 128)]
  assert starts(64, mlp_block=128) == [(0, 64)]
  for bad in (48, 8):  # not dividing 256; below Triton's 16
    with pytest.raises(ValueError, match=f"Tuning.mlp_block={bad} must be a power of two"):
      starts(256, mlp_block=bad)


@pytest.mark.parametrize("unroll", [False, True])
def test_mlp_kernels_lower_for_cuda_with_loops_and_written_out(unroll):
  """Both forms of the TTT-MLP kernels (Tuning.mlp_unroll) lower to Triton for a GPU."""
  args = inputs("mlp", n=2)
  loss = lambda *a: jnp.sum(ttt_pallas_mlp.mlp_sequence(*a)[1])  # noqa: E731
  with ttt_pallas.tuning(mlp_block=16, mlp_unroll=unroll):
    text = lowering.export_cuda(jax.grad(loss, argnums=(0, 2)), *args).mlir_module()
  assert sorted(set(re.findall(r'name = "(_\w+_kernel)"', text))) == [
      "_mlp_bwd_kernel", "_mlp_fwd_kernel"]


def test_mlp_unroll_sets_loops_or_straight_code_over_the_hidden_blocks():
  """`Tuning.mlp_unroll`: False runs each kernel's passes over the hidden blocks as loops in the
  kernel (one copy of a block's code, whatever the number of blocks); True writes every block's
  code out, so the kernels grow with the blocks and have only the mini-batch loop."""
  def kernels(**tune):  # hidden 64: 4 blocks of 16
    return kernel_jaxprs("mlp", mlp_block=16, **tune)

  loops = lambda text: text.count("scan[") + text.count("while[")  # noqa: E731
  rolled, unrolled = kernels(), kernels(mlp_unroll=True)
  # forward: W_0's copy, P2's blocks and the update's blocks in the mini-batch loop; backward:
  # the cotangents' copy, P2's blocks and the two passes
  assert [loops(str(k)) for k in rolled] == [4, 5]
  assert [loops(str(k)) for k in unrolled] == [1, 1]
  # the code grows: more than twice the equations, those of loop bodies included
  assert all(equations(u) > 2 * equations(r) for r, u in zip(rolled, unrolled, strict=True))


def _is_barrier(eqn) -> bool:
  return eqn.primitive.name.startswith("debug_barrier")


def _bodies(eqn) -> list:
  """The jaxprs an equation runs (a loop's body and condition)."""
  return [inner for p in eqn.params.values()
          if hasattr(inner := getattr(p, "jaxpr", p), "eqns")]


def equations(jaxpr) -> int:
  """The equations of a jaxpr and of the loop bodies it runs."""
  return sum(1 + sum(equations(b) for b in _bodies(e)) for e in jaxpr.eqns)


def barrier_problems(jaxpr) -> list[str]:
  """What breaks the kernels' rule for the threads of a program, in one jaxpr and the loop
  bodies it runs: (1) between two barriers, a ref window read and written (another thread may
  store before this one loads; windows are told apart by their index operands: the same
  variables and constants, the same window), (2) a loop body with barriers whose last one does
  not follow its last write (the next trip would read memory no barrier fenced)."""
  found, reads, writes = [], set(), set()

  def window(eqn, first):  # get: (ref, *index); swap: (ref, value, *index)
    index = tuple(repr(v.val) if hasattr(v, "val") else id(v) for v in eqn.invars[first:])
    return id(eqn.invars[0]), str(eqn.params.get("tree")), index

  for eqn in [*jaxpr.eqns, None]:
    if eqn is None or _is_barrier(eqn):
      found += [f"ref window {w} read and written" for w in reads & writes]
      reads, writes = set(), set()
      continue
    if eqn.primitive.name == "get":
      reads.add(window(eqn, 1))
    elif eqn.primitive.name == "swap":
      writes.add(window(eqn, 2))
    for body in _bodies(eqn):
      found += barrier_problems(body)
      kinds = [("barrier" if _is_barrier(e) else "write") for e in body.eqns
               if _is_barrier(e) or e.primitive.name == "swap" or _bodies(e)]
      if "barrier" in kinds and kinds[-1] != "barrier":
        found.append(f"a loop body writes after its last barrier: {kinds}")
  return found


def barrier_counts(jaxpr, depth=0) -> list[tuple[int, int]]:
  """(loop depth, barriers) of each jaxpr that has any, depth first."""
  n = sum(map(_is_barrier, jaxpr.eqns))
  inner = [c for e in jaxpr.eqns for b in _bodies(e) for c in barrier_counts(b, depth + 1)]
  return ([(depth, n)] if n else []) + inner


# the kernels' barriers: TTT-MLP's forward after W_0's copy and at the end of each mini-batch;
# its backward after the cotangents' copy, between the two passes and at the end of each
# mini-batch; TTT-Linear's kernels carry W in registers and need none
BARRIERS = {"linear": [[], []], "mlp": [[(0, 1), (1, 1)], [(0, 1), (1, 2)]]}


def kernel_jaxprs(kind: str, **tune) -> list:
  """The forward and backward kernel bodies of `kind` as a GPU builds them (barriers in)."""
  args = inputs(kind, n=2)
  kernels = {"linear": ttt_pallas_linear.linear_sequence, "mlp": ttt_pallas_mlp.mlp_sequence}
  loss = lambda *a: jnp.sum(kernels[kind](*a, interpret=False)[1])  # noqa: E731
  with ttt_pallas.tuning(**tune):
    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2)))(*args)
  return [e.params["jaxpr"] for e in closed.jaxpr.eqns if e.primitive.name == "pallas_call"]


@pytest.mark.parametrize("kind,tune", [("linear", {}), ("linear", {"linear_output": "xla"}),
                                       ("mlp", {}), ("mlp", {"mlp_block": 16}),
                                       ("mlp", {"mlp_block": 16, "mlp_unroll": True})])
def test_kernels_keep_the_barrier_rule(kind, tune):
  """The interpreter the other tests run has one thread, so a race between the threads of a
  program cannot show there. What it can be checked against is the rule the kernels keep."""
  bodies = kernel_jaxprs(kind, **tune)
  assert [barrier_problems(b) for b in bodies] == [[], []]
  assert [barrier_counts(b) for b in bodies] == BARRIERS[kind]


def test_the_barrier_checks_see_a_missing_barrier(monkeypatch):
  """Without its barriers TTT-MLP's kernels fail the checks above (they would race on a GPU)."""
  monkeypatch.setattr(ttt_pallas_mlp, "_barrier", lambda interpret: None)
  bodies = kernel_jaxprs("mlp", mlp_block=16, mlp_unroll=True)
  assert [barrier_counts(b) for b in bodies] == [[], []]
  assert barrier_problems(bodies[1])  # the backward's passes read and write the same windows
  # one barrier short: the backward's last barrier of a mini-batch (the fifth traced: forward
  # copy, forward trip, backward copy, between the passes, end of the trip) dropped
  calls = []

  def all_but_the_fifth(interpret):
    calls.append(interpret)
    if len(calls) != 5:
      common.pltriton.debug_barrier()

  monkeypatch.setattr(ttt_pallas_mlp, "_barrier", all_but_the_fifth)
  forward, backward = kernel_jaxprs("mlp")
  assert len(calls) == 5
  assert barrier_counts(forward) == BARRIERS["mlp"][0]
  assert barrier_counts(backward) == [(0, 1), (1, 1)]
  assert any("writes after its last barrier" in p for p in barrier_problems(backward))


# TTT-MLP's kernels are opt-in (pallas_auto=False in layers/ttt_variants.py): make test-extended.
# 2 heads of 24 run padded to 32 (`common.padded_dim`), as the 760m and 3b presets' 96 and 80
@pytest.mark.parametrize("mixer,heads", [
    ("ttt_linear", 4), ("ttt_linear", 2),
    pytest.param("ttt_mlp", 4, marks=pytest.mark.extended),
    pytest.param("ttt_mlp", 2, marks=pytest.mark.extended)],
    ids=["ttt_linear", "ttt_linear-padded", "ttt_mlp", "ttt_mlp-padded"])
def test_mixer_with_pallas_impl_matches_dual(mixer, heads):
  width = 16 * heads if heads == 4 else 24 * heads
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, width)), jnp.float32)
  pos = jnp.arange(32, dtype=jnp.int32)
  outs = {}
  for impl in ("dual", "pallas"):
    cfg = dataclasses.replace(mixer_cfg(mixer, b=B, impl=impl, remat_group=2), d_model=width,
                              num_heads=heads)
    m = randomize(TTTMixer(cfg, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                           rngs=nnx.Rngs(0)), std=0.1)
    graphdef, params = nnx.split(m)

    def loss(p, x, graphdef=graphdef):
      y, _ = nnx.merge(graphdef, p)(x, pos, None)
      return jnp.sum(jnp.sin(y)), y

    outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  (_, y_d), g_d = outs["dual"]
  (_, y_p), g_p = outs["pallas"]
  assert rel_err(y_p, y_d) <= 2e-5 and tree_rel_err(g_p, g_d) <= 2e-5


@pytest.mark.parametrize("mixer", ["ttt_linear",
                                   pytest.param("ttt_mlp", marks=pytest.mark.extended)])
def test_streaming_with_pallas_impl_equals_its_one_shot(mixer):
  """Streaming calls run the kernels too, the update of a partial mini-batch left out (its rate
  set to 0): the chunks' outputs equal the one-shot call's, and the state after them (inner
  weights, buffered mini-batch) the dual form's after the same chunks."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 48, 64)), jnp.float32)
  pos = jnp.arange(48, dtype=jnp.int32)
  mixers = {impl: randomize(TTTMixer(
      dataclasses.replace(mixer_cfg(mixer, b=B, impl=impl), d_model=64, num_heads=4),
      compute_dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), std=0.1)
      for impl in ("pallas", "dual")}
  m = mixers["pallas"]
  y, _ = m(x, pos, None)
  chunks = ((0, 5), (5, 21), (21, 40))  # 40 = 2 mini-batches of 16 and 8 tokens buffered
  states, ys = {}, []
  for impl, mixer_ in mixers.items():
    state = mixer_.init_state(2)
    for start, stop in chunks:
      if impl == "pallas":  # each streaming call runs the sequence kernels
        jaxpr = jax.make_jaxpr(lambda s, xc, pc, m_=mixer_: m_(xc, pc, s))(
            state, x[:, start:stop], pos[start:stop])
        assert "pallas_call" in str(jaxpr)
      yc, state = mixer_(x[:, start:stop], pos[start:stop], state)
      ys += [yc] if impl == "pallas" else []
    states[impl] = state
  assert rel_err(jnp.concatenate(ys, axis=1), y[:, :40]) <= 2e-5
  assert int(states["pallas"].count) == int(states["dual"].count) == 8
  assert tree_rel_err(states["pallas"].params, states["dual"].params) <= 2e-5
  # the buffered tokens' update is made once their mini-batch completes
  yc, _ = m(x[:, 40:], pos[40:], states["pallas"])
  assert rel_err(yc, y[:, 40:]) <= 2e-5


@pytest.mark.parametrize("platform,b,heads,match", [
    ("tpu", 16, 2, "GPU \\(Triton\\) kernels only"),
    ("gpu", 8, 2, "model.ttt.mini_batch_size=8 must be a power of two >= 16"),
])
def test_pallas_refused_where_it_cannot_run(platform, b, heads, match):
  with building_for(platform), pytest.raises(ConfigError, match=match) as e:
    TTTMixer(mixer_cfg(b=b, impl="pallas", heads=heads), compute_dtype=jnp.float32,
             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert "\n" not in str(e.value)


def test_pallas_accepted_on_gpu_geometry():
  with building_for("gpu"):
    TTTMixer(mixer_cfg(b=16, impl="pallas", heads=2), compute_dtype=jnp.float32,
             param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("platform,mixer,b,heads,want", [
    ("gpu", "ttt_linear", 16, 2, "pallas"), ("gpu", "ttt_linear", 8, 2, "dual"),
    ("gpu", "ttt_linear", 16, 4, "pallas"),  # head dim 8, run padded to 16
    ("gpu", "ttt_mlp", 16, 2, "dual"), ("cpu", "ttt_linear", 16, 2, "dual"),
    ("tpu", "ttt_linear", 16, 2, "dual"),
])
def test_auto_impl(platform, mixer, b, heads, want):
  with building_for(platform):
    m = TTTMixer(mixer_cfg(mixer, b=b, impl="auto", heads=heads), compute_dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert m.impl == want


def test_a_tuning_reaches_functions_whose_traces_jax_keeps():
  """JAX keeps a `jax.checkpoint`-ed function's trace by the function and its argument shapes:
  a step traced inside `tuning(...)` must not reuse one traced outside, nor the other way round
  (the rematerialised blocks the kernels run in are such functions)."""
  read = jax.checkpoint(lambda x: x * ttt_pallas.current_tuning().num_warps)
  default = ttt_pallas.Tuning().num_warps
  outside = float(jax.jit(lambda x: read(x))(1.0))
  with ttt_pallas.tuning(num_warps=2 * default):
    inside = float(jax.jit(lambda x: read(x))(1.0))
  after = float(jax.jit(lambda x: read(x))(1.0))
  assert (outside, inside, after) == (default, 2 * default, default)


@pytest.mark.parametrize("kind,where", [("linear", "kernel"), ("linear", "xla"), ("mlp", "kernel")])
def test_padded_head_dim_lowers_to_triton_kernels_of_the_padded_width(kind, where):
  """A head dim Triton cannot take as a block dimension (24) reaches the kernels padded to the
  next power of two (32), in the GPU's program too."""
  args = inputs(kind, n=3, d=24)  # 48 tokens
  fwd = {"linear": ttt_pallas_linear.linear_sequence, "mlp": ttt_pallas_mlp.mlp_sequence}[kind]
  loss = lambda *a: jnp.sum(fwd(*a)[1])  # noqa: E731
  with ttt_pallas.tuning(linear_output=where):
    text = lowering.export_cuda(jax.grad(loss, argnums=(0, 2)), *args).mlir_module()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert len(calls) == 2  # forward and backward
  for call in calls:  # every sequence operand and result [B, H, T, .] has the padded width
    widths = set(re.findall(r"tensor<2x2x48x(\d+)xf32>", call))  # T = 48
    assert "32" in widths and "24" not in widths, (widths, call[:300])


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_preset_runs_ttt_linear_in_the_kernels_on_a_gpu(scale):
  """The presets' head dims (64 at most scales, 96 at 760m, 80 at 3b) all take the kernels,
  the last two padded to 128; TTT-MLP's stay opt-in."""
  model = load_preset(preset_spec("ttt_linear", scale, "8k")).model
  cfg = ttt_variants.ttt_config(model_config(model), "linear")
  with building_for("gpu"):
    mixer = nnx.eval_shape(lambda: TTTMixer(cfg, compute_dtype=jnp.bfloat16,
                                            param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  assert mixer.impl == "pallas"
  padded = common.padded_dim(mixer.head_dim)
  assert padded == {96: 128, 80: 128}.get(mixer.head_dim, mixer.head_dim)
  model = load_preset(preset_spec("ttt_mlp", scale, "8k")).model
  with building_for("gpu"):
    mlp = nnx.eval_shape(lambda: TTTMixer(ttt_variants.ttt_config(model_config(model), "mlp"),
                                          compute_dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                          rngs=nnx.Rngs(0)))
  assert mlp.impl == "dual"
