"""The one validation path of the scripts' own numeric flags (config knobs have theirs in
config.RANGES): an argparse `type=` per range, and `check_flags` for absl flags, so that a bad
value (`--repeats -1`, `--budget_minutes nan`, `--batch_size -3`) fails in one line naming the
flag and its range before any work.

  p.add_argument("--repeats", type=int_in(1), ...)        # an integer >= 1
  p.add_argument("--budget_minutes", type=float_in(0, open_low=True), ...)   # a float > 0
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping

from ttt_jax.config import ConfigError


def _range_text(lo, hi, open_low: bool) -> str:
  if hi is None:
    return f"{'>' if open_low else '>='} {lo}"
  return f"in {'(' if open_low else '['}{lo}, {hi}]"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
  """argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except (TypeError, ValueError):
      value = None
    if value is None or value < lo or (hi is not None and value > hi):
      raise argparse.ArgumentTypeError(f"expected an integer {_range_text(lo, hi, False)}, "
                                       f"got {text!r}")
    return value
  parse.__name__ = "integer"
  return parse


def float_in(lo: float, hi: float | None = None, *,
             open_low: bool = False) -> Callable[[str], float]:
  """argparse type: a finite float in [lo, hi] ((lo, hi] with open_low; no upper bound when hi
  is None). nan and inf are refused."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except (TypeError, ValueError):
      value = math.nan
    if (not math.isfinite(value) or value < lo or (open_low and value == lo)
        or (hi is not None and value > hi)):
      raise argparse.ArgumentTypeError(f"expected a number {_range_text(lo, hi, open_low)}, "
                                       f"got {text!r}")
    return value
  parse.__name__ = "number"
  return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
positive_float = float_in(0.0, open_low=True)
fraction = float_in(0.0, 1.0)


def check_flags(checks: Mapping[str, tuple[object, Callable[[str], object]]]) -> None:
  """absl flags: {'--name': (value, argparse type)}; raises ConfigError (one line naming the
  flag and its range) for the first value its type refuses. None values (unset) pass."""
  for flag, (value, kind) in checks.items():
    if value is None:
      continue
    try:
      kind(str(value))
    except argparse.ArgumentTypeError as e:
      raise ConfigError(f"{flag}={value}: {e}") from None
