"""train.compilation_cache: JAX's persistent compilation cache, set once at process start-up,
its entries whole or absent (train/compile_cache.py)."""

import os
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as _jax_cache
from jax._src import lru_cache as _lru
from jax.experimental.compilation_cache import compilation_cache

from ttt_jax.train import compile_cache, distributed

ENV = distributed.CACHE_ENV


@pytest.fixture
def fresh_process_cache(monkeypatch):
  """No cache set in this process and no environment override (tests/conftest.py turns the
  cache off for the suite); the process-wide settings are put back afterwards."""
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  monkeypatch.delenv(ENV, raising=False)
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


def _call_and_record(fn, x):
  """fn(x) after JAX forgets its in-memory executables; the cache events and warnings it made."""
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


@pytest.mark.parametrize("hardened", [True, False])
def test_an_entry_cut_short_is_replaced_once_then_read(tmp_path, hardened, fresh_process_cache,
                                                       monkeypatch, caplog):
  """A truncated entry (a writer killed mid-write, as JAX writes in place): with the package's
  reader it costs one compile, after which the entry is whole again; with JAX's own it costs a
  compile on every launch (the control)."""
  path = distributed.enable_compilation_cache(str(tmp_path / "xla"))
  if not hardened:  # enable_compilation_cache installed the package's; take JAX's again
    monkeypatch.setattr(_lru.LRUCache, "put", compile_cache._JAX_PUT)
    monkeypatch.setattr(_jax_cache, "get_executable_and_time", compile_cache._JAX_GET)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  x = np.random.default_rng().normal(size=(24, 24)).astype(np.float32)

  def f(x):
    return jnp.tanh(x @ x.T) * 2.5

  first, _, _ = _call_and_record(f, x)
  entry = os.path.join(path, wait_for_entry(path, "jit_f-"))
  whole = open(entry, "rb").read()
  with open(entry, "wb") as fh:
    fh.write(whole[: len(whole) // 2])

  with caplog.at_level("WARNING"):
    second, hit, unreadable = _call_and_record(f, x)  # reads the cut entry, warns, compiles
  assert not hit and unreadable == 1
  deleted = [r for r in caplog.records if "deleted the entry" in r.getMessage()]
  assert len(deleted) == (1 if hardened else 0)
  wait_for_entry(path, "jit_f-")
  third, hit, unreadable = _call_and_record(f, x)  # the next launch
  if hardened:
    assert hit and unreadable == 0
    assert os.path.getsize(entry) > len(whole) // 2
  else:
    assert not hit and unreadable == 1
    assert os.path.getsize(entry) == len(whole) // 2  # never rewritten
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(third))
  assert not [n for n in os.listdir(path) if n.endswith(compile_cache._PARTIAL)]


def test_a_writer_killed_mid_write_leaves_no_entry_and_its_partial_file_goes(tmp_path):
  """SIGKILL between writing an entry's bytes and naming it: no entry under its final name
  (so no later process reads a cut one); the hidden partial file is deleted once it is an
  hour old, and the next process stores and then reads a whole entry."""
  cache = tmp_path / "xla"
  script = textwrap.dedent(f"""
      import os, signal, sys
      import numpy as np, jax, jax.numpy as jnp
      from ttt_jax.train import distributed
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      distributed.enable_compilation_cache({str(cache)!r})
      if sys.argv[1] == "kill":
        replace = os.replace
        def killed(src, dst):
          if "jit_f-" in os.path.basename(dst):
            os.kill(os.getpid(), signal.SIGKILL)
          replace(src, dst)
        os.replace = killed
      hits = []
      jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
      def f(x):
        return jnp.tanh(x @ x.T) * 2.5
      jax.jit(f)(np.ones((24, 24), np.float32)).block_until_ready()
      print("HIT", "/jax/compilation_cache/cache_hits" in hits)
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop(ENV, None)

  def run(mode):
    return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                          env=env, timeout=300)

  killed = run("kill")
  assert killed.returncode == -9, killed.stderr[-2000:]
  names = os.listdir(cache)
  assert not [n for n in names if n.startswith("jit_f-")], names
  partial = [n for n in names if n.startswith(".jit_f-") and n.endswith(compile_cache._PARTIAL)]
  assert len(partial) == 1, names
  # a young partial file may be another process's write in progress: kept
  assert compile_cache.remove_stale_partials(str(cache)) == 0
  hour_ago = time.time() - compile_cache.STALE_AFTER_S - 60
  os.utime(cache / partial[0], (hour_ago, hour_ago))
  stored = run("plain")  # enable_compilation_cache deletes the stale file, then stores
  assert stored.returncode == 0 and "HIT False" in stored.stdout, stored.stderr[-2000:]
  assert not (cache / partial[0]).exists()
  read = run("plain")
  assert read.returncode == 0 and "HIT True" in read.stdout, read.stderr[-2000:]
  assert "Error reading persistent compilation cache" not in read.stderr


def test_a_write_that_fails_leaves_neither_entry_nor_partial_file(tmp_path, fresh_process_cache,
                                                                  monkeypatch):
  """A full disk while an entry is written: JAX's one warning, the result, and nothing left in
  the directory for a later process to read."""
  path = distributed.enable_compilation_cache(str(tmp_path / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  def full_disk(name, mode="r", *args, **kwargs):
    fh = open(name, mode, *args, **kwargs)  # noqa: SIM115
    if "w" in mode and "jit_g-" in os.path.basename(name):
      real_write = fh.write

      def write(data):
        real_write(data[: len(data) // 3])
        raise OSError(28, "No space left on device")
      fh.write = write
    return fh

  monkeypatch.setattr(compile_cache, "open", full_disk, raising=False)
  x = np.random.default_rng().normal(size=(16, 16)).astype(np.float32)

  def g(x):
    return jnp.sin(x @ x) - x

  with pytest.warns(UserWarning, match="Error writing persistent compilation cache"):
    out = jax.jit(g)(x)
  np.testing.assert_allclose(np.asarray(out), np.sin(x @ x) - x, rtol=1e-4, atol=1e-4)
  assert not [n for n in os.listdir(path) if "jit_g-" in n], os.listdir(path)
