"""Model config keys set to non-default values: each test pins what the key changes in the built
model (its parameters, its modules' settings, the traced program or the logits)."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.layers.norms import RMSNorm
from ttt_jax.models import build_model
from ttt_jax.models.e2e_inner import inner_lr

B, T = 2, 32


def tiny(kind: str = "transformer", **overrides):
  """A tiny `config.model` of `kind` (1 layer, d_model 32, 2 heads); `overrides` set keys, a
  section's keys as `<section>__<key>` (e.g. `ttt__backbone='base'`)."""
  m = build_config(f"model={kind},ctx=64").model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 1, 32, 2, 64
  for key, value in overrides.items():
    section, name = (m, key) if "__" not in key else (m[key.split("__")[0]], key.split("__")[1])
    section[name] = value
  return m


def params(model) -> dict:
  """{path of names: array} of the model's parameters."""
  return {tuple(str(k) for k in path): var[...]
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def tokens(seed: int = 0, t: int = T) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, t)), jnp.int32)


def logits(model, toks) -> np.ndarray:
  graphdef, state = nnx.split(model)
  out, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, toks)
  return np.asarray(out[..., :259], np.float64)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def copy_shared(src, dst) -> None:
  """Gives `dst` the values of every parameter it shares (by path and shape) with `src`."""
  src_p = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(dst, nnx.Param)):
    if path in src_p and src_p[path][...].shape == var[...].shape:
      var[...] = src_p[path][...]


def test_qk_norm_adds_q_k_norms_that_enter_the_logits():
  """qk_norm=True: every attention layer has q_norm/k_norm scales of the head width (none with
  False); with all other weights equal the logits differ from qk_norm=False, and scaling the
  q_norm weights changes them."""
  on, off = build_model(tiny(qk_norm=True), 0), build_model(tiny(qk_norm=False), 0)
  p_on, p_off = params(on), params(off)
  norms = {p for p in p_on if len(p) > 1 and p[-2] in ("q_norm", "k_norm")}
  assert norms == {("blocks", "0", "mixer", n, "scale") for n in ("q_norm", "k_norm")}
  assert all(p_on[p].shape == (16,) for p in norms)
  assert not any(n in p for p in p_off for n in ("q_norm", "k_norm"))
  copy_shared(off, on)
  toks = tokens(1)
  base_on, base_off = logits(on, toks), logits(off, toks)
  assert rel_err(base_on, base_off) > 1e-3
  scale = jnp.asarray(np.random.default_rng(2).uniform(0.5, 3.0, 16), jnp.float32)
  on.blocks[0].mixer.q_norm.scale[...] = scale
  assert rel_err(logits(on, toks), base_on) > 1e-3


def test_post_norm_adds_post_norms_that_change_the_logits():
  """post_norm=True: each block has mixer_post_norm and mlp_post_norm scales (none with False)
  and, with all other weights equal, different logits."""
  on, off = build_model(tiny(post_norm=True), 0), build_model(tiny(post_norm=False), 0)
  p_on, p_off = params(on), params(off)
  extra = set(p_on) - set(p_off)
  assert extra == {("blocks", "0", n, "scale") for n in ("mixer_post_norm", "mlp_post_norm")}
  assert set(p_off) <= set(p_on)
  copy_shared(off, on)
  toks = tokens(3)
  assert rel_err(logits(on, toks), logits(off, toks)) > 1e-2


@pytest.mark.parametrize("eps", [1e-6, 1e-1])
def test_norm_eps_reaches_every_norm_and_follows_the_formula(eps):
  """norm_eps: every RMSNorm of the model (block, final, q/k norms) holds it, and one of them
  computes x / sqrt(mean(x^2) + eps) * scale on small-scale inputs (where eps matters)."""
  model = build_model(tiny(norm_eps=eps, qk_norm=True), 0)
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, RMSNorm)]
  assert len(norms) == 5  # mixer_norm, q_norm, k_norm, mlp_norm, final_norm
  assert all(n.eps == eps for n in norms)
  x = 0.05 * np.random.default_rng(4).standard_normal((B, T, 32))
  scale = np.random.default_rng(5).uniform(0.5, 1.5, 32)
  norm = model.final_norm
  norm.scale[...] = jnp.asarray(scale, jnp.float32)
  want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale
  got = norm(jnp.asarray(x, jnp.float32))
  assert rel_err(got, want) < 1e-5
  other = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + (1e-1 if eps < 1e-3 else 1e-6))
  assert rel_err(got, other * scale) > 0.5  # the two eps give far apart outputs here


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_init_std_sets_the_std_of_initial_weights(std):
  """init_std: the embedding, head, Q/K/V projections and MLP w1/w3 are N(0, init_std^2); the
  residual-stream writers (attention wo, MLP w2) use init_std / sqrt(2 * num_layers)."""
  cfg = tiny(init_std=std, num_layers=2)
  p = params(build_model(cfg, 0))
  direct = [("embed", "embedding"), ("head",)]
  scaled = []
  for i in ("0", "1"):
    direct += [("blocks", i, "mixer", w, "kernel") for w in ("wq", "wk", "wv")]
    direct += [("blocks", i, "mlp", w) for w in ("w1", "w3")]
    scaled += [("blocks", i, "mixer", "wo", "kernel"), ("blocks", i, "mlp", "w2")]
  for path, want in [(q, std) for q in direct] + [(q, std / 2.0) for q in scaled]:
    w = np.asarray(p[path], np.float64)
    tol = 4.0 / np.sqrt(2 * w.size)  # ~4 standard errors of a sample std
    assert abs(w.std() / want - 1.0) < max(tol, 0.03), (path, w.std(), want)
    assert abs(w.mean()) < 4 * want / np.sqrt(w.size), path


@pytest.mark.parametrize("name,want", [("bfloat16", jnp.bfloat16), ("float32", jnp.float32)])
def test_param_dtype_sets_every_parameter_dtype(name, want):
  """param_dtype: every parameter of a built model (TTT mixer, conv, norms, embedding, head) has
  that dtype, and the model still gives finite fp32 logits."""
  model = build_model(tiny("ttt_linear", param_dtype=name), 0)
  dtypes = {path: v.dtype for path, v in params(model).items()}
  assert dtypes and all(d == want for d in dtypes.values()), dtypes
  out = logits(model, tokens(6))
  assert np.all(np.isfinite(out))


def count_eqns(jaxpr, name: str) -> list:
  """The equations of primitive `name` in `jaxpr` and every jaxpr nested in it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += count_eqns(sub, name)
  return found


def attention_of(**overrides):
  model = build_model(tiny(**overrides), 0)
  return model.blocks[0].mixer


def test_attention_block_sets_the_blocked_path_query_blocks():
  """attention_block: the built attention's algorithm holds it, and a one-shot pass of T=64
  (auto algorithm) runs T / block query blocks (two score/value matmuls each, next to the four
  projections), with equal outputs for every block size."""
  x = jax.random.normal(jax.random.key(7), (B, 64, 32))
  pos = jnp.arange(64, dtype=jnp.int32)
  outs = {}
  for block in (16, 32):
    attn = attention_of(attention_block=block)
    assert attn.algorithm.block == block
    jaxpr = jax.make_jaxpr(lambda x, attn=attn: attn(x, pos)[0])(x).jaxpr
    assert len(count_eqns(jaxpr, "dot_general")) == 4 + 2 * (64 // block)
    outs[block] = attn(x, pos)[0]
  assert rel_err(outs[16], outs[32]) < 1e-5


def test_attention_flash_block_sets_the_blockwise_tiles():
  """attention_flash_block: the built attention's algorithm holds it, and under the blockwise
  algorithm a pass of T=64 loops over T / flash_block query blocks, each scanning T /
  flash_block key blocks; outputs equal the dense algorithm's."""
  x = jax.random.normal(jax.random.key(8), (B, 64, 32))
  pos = jnp.arange(64, dtype=jnp.int32)
  dense = attention_of(attention_algorithm="dense")
  want = dense(x, pos)[0]
  for fb in (16, 32):
    attn = attention_of(attention_algorithm="blockwise", attention_flash_block=fb)
    assert attn.algorithm.flash_block == fb
    jaxpr = jax.make_jaxpr(lambda x, attn=attn: attn(x, pos)[0])(x).jaxpr
    lengths = sorted(e.params["length"] for e in count_eqns(jaxpr, "scan"))
    assert lengths == [64 // fb, 64 // fb], lengths
    assert rel_err(attn(x, pos)[0], want) < 1e-5


def test_ttt_backbone_names_the_parameters():
  """ttt.backbone: 'mamba' has the block conv branch (conv_norm, conv) and, in the mixer, Q/K
  convs on a shared projection plus the output gate wg, and no wk; 'base' has wk and none of
  the others."""
  mamba = params(build_model(tiny("ttt_linear", ttt__backbone="mamba"), 0))
  base = params(build_model(tiny("ttt_linear", ttt__backbone="base"), 0))
  only_mamba = {p[2] if p[2] != "mixer" else p[3] for p in set(mamba) - set(base)}
  only_base = {p[2] if p[2] != "mixer" else p[3] for p in set(base) - set(mamba)}
  assert only_mamba == {"conv_norm", "conv", "conv_q", "conv_k", "wg"}
  assert only_base == {"wk"}


@pytest.mark.parametrize("width", [2, 4])
def test_ttt_conv_width_sets_kernels_and_stream_history(width):
  """ttt.conv_width: the block conv's and the mixer's Q/K conv kernels are [width, D], and the
  streaming cache keeps the last width - 1 inputs of each ([B, width - 1, D])."""
  model = build_model(tiny("ttt_linear", ttt__conv_width=width), 0)
  blk = model.blocks[0]
  for conv in (blk.conv, blk.mixer.conv_q, blk.mixer.conv_k):
    assert conv.kernel[...].shape == (width, 32)
  cache = model.init_cache(B)[0]
  assert cache["conv"].shape == (B, width - 1, 32)
  assert cache["mixer"].conv.shape == (B, width - 1, 32)


def e2e_cfg(**overrides):
  m = tiny("e2e", num_layers=2, window=32, e2e__mini_batch_size=16, **overrides)
  m.e2e.prime_intermediate_size = 96
  return m


def test_e2e_ilr_init_sets_the_step0_inner_lr():
  """e2e.ilr_init: with ilr_warmup_steps=W > 0 the inner LR at step s is
  ilr_init + (inner_lr - ilr_init) * min(1, (s + 1) / W); at step 0 the model's loss reports
  (and uses) ilr_init + (inner_lr - ilr_init) / W, which moves with ilr_init and with it the
  loss of every chunk after the first."""
  w, lr = 4, 0.8
  seen = {}
  batch = {"tokens": tokens(9, T + 1)}
  for init in (0.0, 0.4):
    cfg = e2e_cfg(e2e__inner_lr=lr, e2e__ilr_init=init, e2e__ilr_warmup_steps=w)
    want = init + (lr - init) / w
    model = build_model(cfg, 0)
    assert float(inner_lr(model.cfg.e2e, 0)) == pytest.approx(want, rel=1e-6)
    assert float(inner_lr(model.cfg.e2e, w - 1)) == pytest.approx(lr, rel=1e-6)
    graphdef, state = nnx.split(model)
    _, metrics = jax.jit(
        lambda s, g=graphdef: nnx.merge(g, s).compute_loss(batch, step=0))(state)
    assert float(metrics["inner_lr"]) == pytest.approx(want, rel=1e-6)
    seen[init] = (float(metrics["loss_first_chunk"]), float(metrics["loss_last_chunk"]))
  # the first chunk is scored before any inner update; the later ones after updates at this LR
  assert seen[0.0][0] == pytest.approx(seen[0.4][0], rel=1e-6)
  assert abs(seen[0.0][1] / seen[0.4][1] - 1.0) > 1e-5


def test_e2e_prime_intermediate_size_sets_the_prime_mlp_width():
  """e2e.prime_intermediate_size: the suffix block's prime MLP is [D, P] / [P, D] with P that
  key, while every ordinary MLP keeps intermediate_size and prefix blocks have no prime MLP."""
  model = build_model(e2e_cfg(), 0)
  prefix, suffix = model.blocks[0], model.blocks[1]
  assert prefix.prime_mlp is None
  assert suffix.prime_mlp.w1[...].shape == suffix.prime_mlp.w3[...].shape == (32, 96)
  assert suffix.prime_mlp.w2[...].shape == (96, 32)
  for blk in (prefix, suffix):
    assert blk.mlp.w1[...].shape == (32, 64) and blk.mlp.w2[...].shape == (64, 32)


def test_e2e_remat_chunks_checkpoints_the_chunk_steps_with_the_same_numbers():
  """e2e.remat_chunks: True puts the inner loop's chunk step under jax.checkpoint (a
  checkpointed region in the meta loss's program that False does not have); the meta loss and
  its second-order gradients are the same either way."""
  batch = {"tokens": tokens(10, T + 1)}
  out = {}
  for remat in (True, False):
    model = build_model(e2e_cfg(e2e__inner_lr=0.5, e2e__remat_chunks=remat), 0)
    graphdef, state = nnx.split(model)

    def loss(s, g=graphdef):
      return nnx.merge(g, s).compute_loss(batch, step=0)[0]

    grad_fn = jax.value_and_grad(loss)
    jaxpr = jax.make_jaxpr(loss)(state).jaxpr  # jax.checkpoint's primitive is `remat2`
    n_ckpt = len(count_eqns(jaxpr, "remat2")) + len(count_eqns(jaxpr, "checkpoint"))
    out[remat] = (n_ckpt, *jax.jit(grad_fn)(state))
  (n_on, l_on, g_on), (n_off, l_off, g_off) = out[True], out[False]
  assert n_on > n_off, (n_on, n_off)
  assert rel_err(l_on, l_off) < 1e-6
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("window", [4, 8])
def test_window_sets_how_far_back_swa_sees(window):
  """model.window (model=swa, one layer): a token changes the logits at its own position and the
  window - 1 after it, no others; the streaming cache holds `window` slots."""
  model = build_model(tiny("swa", window=window), 0)
  toks = tokens(1)
  p = 5
  moved = toks.at[:, p].set((toks[:, p] + 7) % 256)
  change = np.abs(logits(model, moved) - logits(model, toks)).max(axis=(0, 2))
  assert set(np.flatnonzero(change > 1e-6)) == set(range(p, p + window))
  assert model.init_cache(B)[0].pos.shape == (window,)


def test_ttt_mini_batch_size_sets_where_the_inner_weights_step():
  """ttt.mini_batch_size b: the first b tokens read the initial W (with their own in-batch
  gradients), so models that differ only in b agree on the first min(b) tokens' logits and
  differ from the next one on, where the smaller b has stepped W."""
  small = build_model(tiny("ttt_linear", ttt__mini_batch_size=4), 0)
  large = build_model(tiny("ttt_linear", ttt__mini_batch_size=8), 0)
  copy_shared(small, large)  # all but tau, one per position of a mini-batch
  assert small.blocks[0].mixer.mini_batch_size == 4 and large.blocks[0].mixer.mini_batch_size == 8
  toks = tokens(2)
  a, b = logits(small, toks), logits(large, toks)
  assert rel_err(a[:, :4], b[:, :4]) < 1e-5
  assert all(rel_err(a[:, t], b[:, t]) > 1e-4 for t in range(4, 8))
  # with b=4, token 0 reaches positions 4-7 only through the stepped W (the convs of width 4
  # reach 3 positions back; one layer)
  moved = logits(small, toks.at[:, 0].set((toks[:, 0] + 5) % 256))
  assert all(rel_err(moved[:, t], a[:, t]) > 1e-6 for t in range(4, 8))


@pytest.mark.parametrize("kind", ["swa", "ttt_linear"])
def test_compute_dtype_sets_the_matmuls_dtype(kind):
  """compute_dtype=bfloat16: every matmul of the forward pass but the TTT inner loop's (kept in
  float32) takes bfloat16 operands, with float32 parameters; float32: none does. The logits
  come out float32 either way."""
  dots = {}
  for name in ("float32", "bfloat16"):
    model = build_model(tiny(kind, compute_dtype=name), 0)
    assert {v.dtype for v in params(model).values()} == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x, g=graphdef: nnx.merge(g, s)(x)[0])(state, tokens(7))
    assert jaxpr.out_avals[0].dtype == jnp.float32
    found = count_eqns(jaxpr.jaxpr, "dot_general")
    dots[name] = [{v.aval.dtype for v in e.invars} for e in found]
  assert all(d == {jnp.dtype(jnp.float32)} for d in dots["float32"])
  bf16 = [d for d in dots["bfloat16"] if d == {jnp.dtype(jnp.bfloat16)}]
  assert len(bf16) >= 4  # the projections, the MLP and the head at least
  if kind == "swa":  # attention's products too
    assert len(bf16) == len(dots["bfloat16"])
  else:  # the rest are the inner loop's, in float32 only
    inner = [d for d in dots["bfloat16"] if d not in bf16]
    assert inner and all(d == {jnp.dtype(jnp.float32)} for d in inner)
