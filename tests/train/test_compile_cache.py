"""train/compile_cache.py: entries of the compilation cache whole or absent; an entry cut short is
replaced once, not recompiled on every launch."""

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as _jax_cache
from jax._src import lru_cache as _lru

from ttt_jax.train import compile_cache, distributed

# fresh_process_cache: a fixture, used by name
from .test_compilation_cache import ENV, call_and_record, fresh_process_cache, wait_for_entry  # noqa: F401


@pytest.mark.usefixtures("fresh_process_cache")
@pytest.mark.parametrize("hardened", [True, False])
def test_an_entry_cut_short_is_replaced_once_then_read(tmp_path, hardened, monkeypatch, caplog):
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

  first, _, _ = call_and_record(f, x)
  entry = os.path.join(path, wait_for_entry(path, "jit_f-"))
  whole = open(entry, "rb").read()
  with open(entry, "wb") as fh:
    fh.write(whole[: len(whole) // 2])

  with caplog.at_level("WARNING"):
    second, hit, unreadable = call_and_record(f, x)  # reads the cut entry, warns, compiles
  assert not hit and unreadable == 1
  deleted = [r for r in caplog.records if "cut short or damaged" in r.getMessage()]
  assert len(deleted) == (1 if hardened else 0)
  wait_for_entry(path, "jit_f-")
  third, hit, unreadable = call_and_record(f, x)  # the next launch
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


@pytest.mark.usefixtures("fresh_process_cache")
def test_a_write_that_fails_leaves_neither_entry_nor_partial_file(tmp_path, monkeypatch):
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


@pytest.mark.usefixtures("fresh_process_cache")
def test_a_whole_entry_stays_when_loading_fails_for_another_reason(tmp_path, monkeypatch, caplog):
  """Loading can fail with the entry intact (device memory, a driver): JAX's warning and a
  compile, and the entry is kept for the next process."""
  path = distributed.enable_compilation_cache(str(tmp_path / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  x = np.random.default_rng().normal(size=(20, 20)).astype(np.float32)

  def h(x):
    return jnp.cos(x.T @ x) + x

  first, _, _ = call_and_record(h, x)
  entry = os.path.join(path, wait_for_entry(path, "jit_h-"))
  before = open(entry, "rb").read()

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while loading the executable")

  monkeypatch.setattr(compile_cache, "_JAX_GET", out_of_memory)
  with caplog.at_level("WARNING"):
    second, hit, unreadable = call_and_record(h, x)
  assert not hit and unreadable == 1
  assert not [r for r in caplog.records if "cut short or damaged" in r.getMessage()]
  assert open(entry, "rb").read() == before
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.usefixtures("fresh_process_cache")
@pytest.mark.parametrize("bounded", [False, True])
def test_a_size_bounded_cache_keeps_jax_own_writer(tmp_path, bounded, monkeypatch):
  """With `jax_compilation_cache_max_size` set JAX's writer runs (its locking and its record of
  each entry's last use, the `-atime` file); unset, the package's whole-or-absent writer."""
  if bounded:
    pytest.importorskip("filelock")  # JAX's size accounting needs it
  written = []
  write_whole = compile_cache._write_whole
  monkeypatch.setattr(compile_cache, "_write_whole",
                      lambda final, value: (written.append(final), write_whole(final, value)))
  before = jax.config.jax_compilation_cache_max_size
  jax.config.update("jax_compilation_cache_max_size", 1 << 30 if bounded else -1)
  try:
    path = distributed.enable_compilation_cache(str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    x = np.random.default_rng().normal(size=(12, 12)).astype(np.float32)
    jax.jit(lambda x: jnp.exp(x @ x) / 7.0)(x).block_until_ready()
    wait_for_entry(path, "jit__lambda")
  finally:
    jax.config.update("jax_compilation_cache_max_size", before)
  names = os.listdir(path)
  entries = [n for n in names if n.startswith("jit__lambda") and n.endswith("-cache")]
  assert len(entries) == 1, names
  assert (entries[0].removesuffix("-cache") + "-atime" in names) == bounded, names
  ours = [w for w in written if os.path.basename(w) == entries[0]]
  assert len(ours) == (0 if bounded else 1), written
  assert not [n for n in names if n.endswith(compile_cache._PARTIAL)]
