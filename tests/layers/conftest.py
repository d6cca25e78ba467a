"""Layer tests build layers directly rather than through `models.build_model`, so they build
them inside the same `lazy_variable_sharding()` context (parameters keep their logical axis
names and are not placed on a mesh when created; no mesh is in scope here)."""

import pytest

from ttt_jax.sharding import lazy_variable_sharding


@pytest.fixture(autouse=True)
def _lazy_variable_sharding():
  with lazy_variable_sharding():
    yield
