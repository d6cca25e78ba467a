"""The test tiers: `make test` runs the core, `make test-extended` the tests marked `extended`
(.ci/run runs both)."""

from __future__ import annotations

import pytest


def core_and_extended(values, core) -> list:
  """`values` for `pytest.mark.parametrize`, each not in `core` marked `extended`."""
  return [v if v in core else pytest.param(v, marks=pytest.mark.extended) for v in values]
