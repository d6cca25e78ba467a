"""The frozen model config: one field per `config.model` knob, the same defaults, built once."""

from __future__ import annotations

import dataclasses

import pytest

from ttt_jax.config import base_config, build_config
from ttt_jax.layers import ttt_variants
from ttt_jax.layers.ttt import TTTConfig
from ttt_jax.models.config import E2ESection, ModelConfig, TTTSection, model_config


def fields_of(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def test_fields_and_defaults_are_the_configdicts():
  """A knob added to `base_config` fails here until ModelConfig has it (with the same default)."""
  section = base_config().model
  assert fields_of(ModelConfig) == set(section.keys())
  assert fields_of(TTTSection) == set(section.ttt.keys())
  assert fields_of(E2ESection) == set(section.e2e.keys())
  assert model_config(section) == ModelConfig()


def test_built_from_a_preset_and_frozen():
  section = build_config("model=e2e,scale=tiny").model
  cfg = model_config(section)
  assert (cfg.kind, cfg.mixer, cfg.e2e.suffix_len) == ("e2e", "swa", section.e2e.suffix_len)
  assert model_config(cfg) is cfg and hash(cfg) == hash(model_config(section))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3
  assert cfg.out_std == section.init_std / (2 * section.num_layers) ** 0.5


def test_the_ttt_layers_own_config_defaults_are_the_models():
  """`TTTConfig` (the layer built on its own) defaults to what `base_config` gives a model."""
  cfg = model_config(base_config().model)
  layer = TTTConfig(d_model=cfg.d_model, num_heads=cfg.num_heads)
  # every knob but the depth-scaled output std, which only a model knows
  assert ttt_variants.ttt_config(cfg, "linear") == dataclasses.replace(layer, out_std=cfg.out_std)
