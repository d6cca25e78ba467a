"""TLM adaptation knobs: `--config configs/tlm.py[:key=value,...]` (see ttt_jax/eval/tlm.py).

Defaults follow the paper (LoRA on the projections, Adam, batch 1, λ = 0.1, objective
S·P = `perplexity`) except the learning rate, 3e-4 where the paper has 5e-5 (tuned on SmolLM2-135M,
docs/tlm.md), and the threshold: `log_p0=default` is `auto` (validation log-perplexity
+ log_p0_margin) for byte-level runs and the paper's 3 for subword tokenizers. Override any knob
on the command line, e.g. `--config.lr=1e-3 --config.log_p0=2.5 --config.objective=log_perplexity`.
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
    try:
      c[key] = type(c[key])(value) if not isinstance(c[key], bool) else value.lower() == "true"
    except ValueError:
      raise ConfigError(f"configs/tlm.py arg {key}={value!r}: expected a "
                        f"{type(c[key]).__name__}") from None
  return validate_config(c)
