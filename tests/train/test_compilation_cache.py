"""train.compilation_cache: JAX's persistent compilation cache, set once at process start-up."""

import os
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache as _jax_cache
from jax._src import lru_cache as _lru
from jax.experimental.compilation_cache import compilation_cache

from ttt_jax.train import distributed

ENV = distributed.CACHE_ENV


@pytest.fixture
def fresh_process_cache(monkeypatch):
  """No cache set in this process and no environment override (tests/conftest.py turns the
  cache off for the suite); the process-wide settings are put back afterwards."""
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  monkeypatch.delenv(ENV, raising=False)
  # enable_compilation_cache installs train/compile_cache.py's reader and writer for the
  # process: JAX's own are put back afterwards
  monkeypatch.setattr(_lru.LRUCache, "put", _lru.LRUCache.put)
  monkeypatch.setattr(_jax_cache, "get_executable_and_time", _jax_cache.get_executable_and_time)
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
  compilation_cache.reset_cache()


def wait_for_entry(path, prefix, timeout=30.0):
  """The cache entry whose name starts with `prefix` (JAX may write it after the call returns)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    found = [e for e in os.listdir(path) if e.startswith(prefix)]
    if found:
      return found[0]
    time.sleep(0.05)
  raise AssertionError(f"no {prefix}* entry in {path}: {os.listdir(path)}")


def call_and_record(fn, x):
  """fn(x) after JAX forgets its in-memory executables: (the result, whether the program came
  from the persistent cache, how many of JAX's "cannot read an entry" warnings it made)."""
  jax.clear_caches()
  events = []
  listener = lambda event, **kw: events.append(event)  # noqa: E731
  jax.monitoring.register_event_listener(listener)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = jax.jit(fn)(x)
  finally:
    jax.monitoring.unregister_event_listener(listener)
  unreadable = [w for w in caught if "Error reading persistent compilation cache" in str(w.message)]
  return out, "/jax/compilation_cache/cache_hits" in events, len(unreadable)


def test_empty_path_leaves_the_cache_off(fresh_process_cache):
  assert distributed.enable_compilation_cache("") is None
  assert jax.config.jax_compilation_cache_dir is None


def test_compiled_programs_are_written_to_the_cache_and_read_back(tmp_path, fresh_process_cache):
  path = distributed.enable_compilation_cache(str(tmp_path / "xla"))
  assert path == str(tmp_path / "xla") and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even tiny ones
  x = jax.random.normal(jax.random.key(0), (16, 16))

  def f(x):
    return jnp.tanh(x @ x.T) * 3.0

  first = jax.jit(f)(x)
  stored = wait_for_entry(path, "jit_f-")  # the compiled program was stored
  mtime = os.path.getmtime(os.path.join(path, stored))
  second, hit, _ = call_and_record(f, x)  # the in-memory executable forgotten: reads the file
  assert hit
  assert jnp.array_equal(first, second)
  assert [e for e in os.listdir(path) if e.startswith("jit_f-")] == [stored]
  assert os.path.getmtime(os.path.join(path, stored)) == mtime  # read back, not written again


def test_first_directory_stays_and_the_environment_overrides_the_config(
    tmp_path, monkeypatch, fresh_process_cache):
  monkeypatch.setenv(ENV, str(tmp_path / "from_env"))
  assert distributed.enable_compilation_cache(str(tmp_path / "from_config")) == str(
      tmp_path / "from_env")
  # a second call (e.g. another run of --compare) keeps the process's directory
  monkeypatch.delenv(ENV)
  assert distributed.enable_compilation_cache(str(tmp_path / "other")) == str(tmp_path / "from_env")
  assert not os.path.exists(tmp_path / "other")


def test_environment_can_turn_the_cache_off(tmp_path, monkeypatch, fresh_process_cache):
  monkeypatch.setenv(ENV, "")
  assert distributed.enable_compilation_cache(str(tmp_path / "xla")) is None
  assert not os.path.exists(tmp_path / "xla")


def test_home_relative_path_is_expanded(tmp_path, monkeypatch, fresh_process_cache):
  monkeypatch.setenv("HOME", str(tmp_path))
  path = distributed.enable_compilation_cache("~/cache/xla")
  assert path == str(tmp_path / "cache" / "xla") and os.path.isdir(path)


@pytest.mark.parametrize("problem", ["under_a_file", "read_only"])
def test_unusable_directory_is_one_warning_and_no_cache(tmp_path, problem, fresh_process_cache,
                                                        caplog):
  if problem == "under_a_file":
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "xla"
  else:
    if os.geteuid() == 0:
      pytest.skip("root can write into a read-only directory")
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
  with caplog.at_level("WARNING"):
    assert distributed.enable_compilation_cache(str(target)) is None
  assert jax.config.jax_compilation_cache_dir is None
  warnings = [r for r in caplog.records if "compilation cache" in r.getMessage()]
  assert len(warnings) == 1 and "train.compilation_cache" in warnings[0].getMessage()


def test_enabling_after_earlier_compilations_still_stores_programs(tmp_path, monkeypatch):
  """What the evaluation scripts do: programs compiled before the call (loading the run) and
  the cache set afterwards, in a fresh process (no reset of JAX's cache state)."""
  monkeypatch.delenv(ENV, raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # one set around the suite
  script = textwrap.dedent(f"""
      import os, jax, jax.numpy as jnp
      from ttt_jax.train import distributed
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.jit(lambda x: x * 2.0)(jnp.ones(4)).block_until_ready()  # before the cache is set
      path = distributed.enable_compilation_cache({str(tmp_path / "xla")!r})
      jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
      print("DIR", path)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, check=True)
  assert f"DIR {tmp_path / 'xla'}" in out.stdout
  assert any(e.startswith("jit__lambda") for e in os.listdir(tmp_path / "xla"))

