"""The scripts' numeric flag types (ttt_jax/argtypes.py): ranges, nan/inf refused, absl flags
checked by the same types."""

import argparse

import pytest

from ttt_jax.argtypes import (
  check_flags,
  float_in,
  fraction,
  int_in,
  non_negative_int,
  positive_float,
  positive_int,
)
from ttt_jax.config import ConfigError


@pytest.mark.parametrize("kind, good, bad", [
    (positive_int, ["1", "7"], ["0", "-1", "1.5", "x", ""]),
    (non_negative_int, ["0", "3"], ["-1", "nan"]),
    (int_in(2, 4), ["2", "4"], ["1", "5"]),
    (positive_float, ["1e-9", "3"], ["0", "-1", "nan", "inf", "-inf", "x"]),
    (fraction, ["0", "1", "0.5"], ["1.01", "-0.1", "nan"]),
    (float_in(0, 2, open_low=True), ["2"], ["0", "2.5"]),
])
def test_ranges(kind, good, bad):
  for text in good:
    kind(text)
  for text in bad:
    with pytest.raises(argparse.ArgumentTypeError, match=f"got {text!r}"):
      kind(text)


def test_argparse_names_the_flag_and_absl_values_fail_as_config_errors():
  p = argparse.ArgumentParser(exit_on_error=False)
  p.add_argument("--repeats", type=positive_int)
  with pytest.raises(argparse.ArgumentError, match="expected an integer >= 1, got '-1'"):
    p.parse_args(["--repeats", "-1"])
  check_flags({"--batch_size": (0, non_negative_int), "--x": (None, positive_int)})
  with pytest.raises(ConfigError, match=r"^--timeout=nan: expected a number > 0.0, got 'nan'$"):
    check_flags({"--timeout": (float("nan"), positive_float)})
