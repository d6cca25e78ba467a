"""TLM adaptation knobs: `--config configs/tlm.py[:key=value,...]` (see ttt_jax/eval/tlm.py).

Defaults follow the paper (LoRA on the projections, Adam lr 5e-5, batch 1, λ = 0.1,
log P0 = 3). Override any knob on the command line, e.g. `--config.lr=1e-3`.
"""

from ttt_jax.config import ConfigError
from ttt_jax.eval.tlm import default_config, validate_config


def get_config(arg: str | None = None):
  c = default_config()
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(f"configs/tlm.py arg {item!r}: expected key=value")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in c:
      raise ConfigError(f"configs/tlm.py arg key {key!r} unknown; allowed: {', '.join(sorted(c))}")
    c[key] = type(c[key])(value) if not isinstance(c[key], bool) else value.lower() == "true"
  return validate_config(c)
