"""train.compilation_cache: JAX's persistent compilation cache, set once at process start-up."""

import os
import time

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from ttt_jax.config import ConfigError, base_config
from ttt_jax.train import distributed


@pytest.fixture
def restore_cache_settings():
  """Puts the process-wide cache settings back (other tests in this worker share them)."""
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
  compilation_cache.reset_cache()


def config_with(path):
  c = base_config()
  c.train.compilation_cache = path
  return c


def test_empty_path_leaves_the_cache_off(restore_cache_settings):
  before = jax.config.jax_compilation_cache_dir
  assert distributed.enable_compilation_cache(config_with("")) is None
  assert jax.config.jax_compilation_cache_dir == before


def test_compiled_programs_are_written_to_the_cache_and_read_back(tmp_path,
                                                                  restore_cache_settings):
  path = distributed.enable_compilation_cache(config_with(str(tmp_path / "xla")))
  assert path == str(tmp_path / "xla") and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even tiny ones
  compilation_cache.reset_cache()
  x = jax.random.normal(jax.random.key(0), (16, 16))

  def f(x):
    return jnp.tanh(x @ x.T) * 3.0

  first = jax.jit(f)(x)
  stored = wait_for_entry(path, "jit_f-")  # the compiled program was stored
  mtime = os.path.getmtime(os.path.join(path, stored))
  jax.clear_caches()  # forget the in-memory executable: the next call must read the file
  hits = []
  listener = lambda event, **kw: hits.append(event)  # noqa: E731
  jax.monitoring.register_event_listener(listener)
  try:
    second = jax.jit(f)(x)
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert "/jax/compilation_cache/cache_hits" in hits
  assert jnp.array_equal(first, second)
  assert [e for e in os.listdir(path) if e.startswith("jit_f-")] == [stored]
  assert os.path.getmtime(os.path.join(path, stored)) == mtime  # read back, not written again


def wait_for_entry(path, prefix, timeout=30.0):
  """The cache entry whose name starts with `prefix` (JAX may write it after the call returns)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    found = [e for e in os.listdir(path) if e.startswith(prefix)]
    if found:
      return found[0]
    time.sleep(0.05)
  raise AssertionError(f"no {prefix}* entry in {path}: {os.listdir(path)}")


def test_home_relative_path_is_expanded(tmp_path, monkeypatch, restore_cache_settings):
  monkeypatch.setenv("HOME", str(tmp_path))
  path = distributed.enable_compilation_cache(config_with("~/cache/xla"))
  assert path == str(tmp_path / "cache" / "xla") and os.path.isdir(path)


def test_unusable_path_is_one_error_naming_the_key(tmp_path, restore_cache_settings):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match=r"train.compilation_cache=.*cannot create"):
    distributed.enable_compilation_cache(config_with(str(blocker / "xla")))
