"""The TTT variants: the built-in inner models and their registration as sequence mixers.

A TTT variant is an inner model (layers/ttt_inner.py: `InnerModel`: its parameters, `predict`,
and the primal / dual mini-batch steps, optionally a whole-sequence dual form and Pallas
kernels) run by the shared TTT layer (layers/ttt.py: `TTTMixer`). `register_ttt_variant` adds
both the inner model and the mixer `model.mixer = 'ttt_' + name` with the facts the package
asks (weight decay of the inner weights, the Mamba-backbone pre-conv, mini-batch alignment,
config checks, the inner-LR multiplier metric). Built in: TTT-Linear ('ttt_linear') and
TTT-MLP ('ttt_mlp'); docs/ttt.md shows how to add one.

The registry's functions take the model config (models/config.py: `ModelConfig`, built by the
model; `check` takes the whole ConfigDict); `ttt_config` turns it into the layer's `TTTConfig`.
"""

from __future__ import annotations

import functools

import ml_collections

from ttt_jax.config import ConfigError
from ttt_jax.layers import ttt_dual, ttt_inner, ttt_pallas_linear, ttt_pallas_mlp
from ttt_jax.layers.mixers import MixerSpec, ModelCfg, register_mixer
from ttt_jax.layers.ttt import CausalConv, TTTConfig, TTTMixer

LINEAR = ttt_inner.InnerModel(
    name="linear", layers=ttt_dual.LINEAR, widths=lambda d: (d, d),
    predict=ttt_inner.linear_predict, primal=ttt_inner.linear_primal,
    dual=ttt_inner.linear_dual, dual_sequence=ttt_dual.linear_sequence,
    pallas_sequence=ttt_pallas_linear.linear_sequence)
MLP = ttt_inner.InnerModel(
    name="mlp", layers=ttt_dual.MLP, widths=lambda d: (d, 4 * d, d),
    predict=ttt_inner.mlp_predict, primal=ttt_inner.mlp_primal, dual=ttt_inner.mlp_dual,
    dual_sequence=ttt_dual.mlp_sequence, pallas_sequence=ttt_pallas_mlp.mlp_sequence,
    pallas_auto=False)  # opt-in (model.ttt.impl=pallas) until timed on a GPU


def pre_conv(cfg: ModelCfg, *, compute_dtype, param_dtype, rngs):
  """The "Mamba backbone"'s h += conv(norm(h)) before the TTT layer; None for 'base'."""
  if cfg.ttt.backbone != "mamba":
    return None
  return CausalConv(cfg.d_model, cfg.ttt.conv_width, axis="embed", compute_dtype=compute_dtype,
                    param_dtype=param_dtype, rngs=rngs)


def check_config(config: ml_collections.ConfigDict) -> None:
  b = config.model.ttt.mini_batch_size
  if config.data.seq_len % b:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be a multiple of "
                      f"model.ttt.mini_batch_size={b}")


def metrics(cfg: ModelCfg, step) -> dict:
  """The inner-LR multiplier at the outer step `step`."""
  return {"ttt_lr_mult": ttt_inner.warmup_lr_mult(step, cfg.ttt.lr_warmup_steps)}


def ttt_config(cfg: ModelCfg, inner: str) -> TTTConfig:
  """The TTT layer's config in the model `cfg` (a `ModelConfig`), running the inner model
  `inner`."""
  t = cfg.ttt
  return TTTConfig(
      d_model=cfg.d_model, num_heads=cfg.num_heads, inner=inner,
      mini_batch_size=t.mini_batch_size, base_lr=t.base_lr, lr_warmup_steps=t.lr_warmup_steps,
      backbone=t.backbone, conv_width=t.conv_width, impl=t.impl, remat_group=t.remat_group,
      rope_theta=cfg.rope_theta, init_std=cfg.init_std, out_std=cfg.out_std)


def build(cfg: ModelCfg, *, inner: str, **kw) -> TTTMixer:
  """The TTT layer of the model `cfg` running the inner model `inner`; kw = compute_dtype,
  param_dtype, rngs."""
  return TTTMixer(ttt_config(cfg, inner), **kw)


def register_ttt_variant(model: ttt_inner.InnerModel) -> MixerSpec:
  """Registers the inner model and the TTT mixer `model.mixer_name` that runs it."""
  ttt_inner.register_inner_model(model)
  return register_mixer(MixerSpec(
      name=model.mixer_name, build=functools.partial(build, inner=model.name),
      decayed=frozenset({"kernel"}) | model.weight_names, pre_conv=pre_conv,
      alignment=lambda cfg: cfg.ttt.mini_batch_size, check=check_config, metrics=metrics))


register_ttt_variant(LINEAR)
register_ttt_variant(MLP)
