"""The pretraining presets by name, as the compile check and gpu-check's 125m rows load them."""

from __future__ import annotations

import os
import runpy

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


# configs/e2e.py fixes each stage's context: 32k and 128k pick its context-extension stages,
# any other ctx its pretraining stage (8K; tiny 512)
E2E_STAGES = {"32k": "ext32k", "128k": "ext128k"}


def preset_spec(kind: str, scale: str, ctx: str) -> str:
  """The config file spec of a kind's pretraining preset (E2E: the stage of `E2E_STAGES`)."""
  if kind == "e2e":
    return f"configs/e2e.py:scale={scale},stage={E2E_STAGES.get(ctx.lower(), 'pretrain')}"
  return f"configs/pretrain.py:model={kind},scale={scale},ctx={ctx}"


def load_preset(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `configs/<file>.py:<arg>` (paths relative to the repository)."""
  path, _, arg = spec.partition(":")
  path = os.path.join(CONFIG_DIR, os.path.basename(path))
  return runpy.run_path(path)["get_config"](arg or None)
