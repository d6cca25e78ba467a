"""The model's configuration as frozen dataclasses, built once from the `config.model` section.

The ml_collections ConfigDict is what configs, command-line overrides, validation and saved runs
use; the model classes (`LanguageModel`, `E2EModel`, their blocks) and the mixer builders of the
registry (layers/mixers.py: `MixerSpec.build`) take a `ModelConfig` instead: immutable, hashable
and typed. `model_config(config.model)` is the one conversion (`build_model` calls it). Field
names are the ConfigDict's own (`cfg.ttt.mini_batch_size` reads the same in both), so the
documentation of the knobs (docs/configs.md) describes these fields too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class TTTSection:
  """`model.ttt`: the TTT layers' own knobs (layers/ttt.py: `TTTConfig` adds the widths)."""

  mini_batch_size: int = 16
  base_lr: float = 1.0
  impl: str = "auto"
  backbone: str = "mamba"
  remat_group: int = 4
  conv_width: int = 4
  lr_warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class E2ESection:
  """`model.e2e`: TTT-E2E's inner loop (models/e2e.py)."""

  train_mode: str = "meta"
  suffix_len: int = 1
  mini_batch_size: int = 128
  prime_intermediate_size: int = 384
  inner_lr: float = 1.0
  ilr_init: float = 0.0
  ilr_warmup_steps: int = 100
  inner_clip: float = 1.0
  remat_chunks: bool = True
  remat_group: int = 0
  remat_chunks_policy: str = "full"
  window_residuals: str = "auto"
  suffix_remat: str = "auto"
  hoist_first_attention: bool = True
  inner_attention_impl: str = "auto"
  inner_attention_block: int = -1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """`config.model` (ttt_jax/config.py: `base_config` documents each knob)."""

  kind: str = "transformer"
  mixer: str = "full"
  vocab_size: int = 259
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 0
  intermediate_size: int = 384
  window: int = 256
  rope_theta: float = 10000.0
  trained_context: int = 0  # the context the weights were trained at (0 = unknown)
  qk_norm: bool = False
  post_norm: bool = False
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  init_std: float = 0.02
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention_algorithm: str = "auto"
  attention_block: int = 256
  attention_flash_block: int = 512
  attention_impl: str = "auto"
  cache_attention_impl: str = "auto"
  ttt: TTTSection = TTTSection()
  e2e: E2ESection = E2ESection()

  @property
  def out_std(self) -> float:
    """Init std of the projections that write into the residual stream (scaled by depth)."""
    return self.init_std / (2 * self.num_layers) ** 0.5


_SECTIONS = {"ttt": TTTSection, "e2e": E2ESection}


def _build(cls, section: ml_collections.ConfigDict) -> Any:
  values = {}
  for field in dataclasses.fields(cls):
    value = section[field.name]
    values[field.name] = (_build(_SECTIONS[field.name], value) if field.name in _SECTIONS
                          else value)
  return cls(**values)


def model_config(cfg: ml_collections.ConfigDict | ModelConfig) -> ModelConfig:
  """The frozen model config of `config.model` (a `ModelConfig` is returned as it is).

  Reads every field by name: a section missing one raises KeyError naming it; keys the
  dataclasses do not know are ignored (`config.validate` rejects unknown keys)."""
  if isinstance(cfg, ModelConfig):
    return cfg
  return _build(ModelConfig, cfg)
