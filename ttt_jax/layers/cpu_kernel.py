"""The package's C++ CPU kernel (layers/csrc/int8_matmul.cc): built once per machine, loaded into
XLA through its FFI.

The first use compiles the source with the system C++ compiler (`$CXX`, else g++, c++ or
clang++) for this CPU (`-march=native`) into `$TTT_JAX_CACHE/kernels/`. The library's name holds
a hash of the source, the compile command, jaxlib's version and the CPU's feature flags, so a
changed source, another jaxlib or another CPU model sharing the cache builds its own. Concurrent
first uses (e.g. several processes) build it once, under a file lock. Nothing is downloaded.

Vector paths: AVX-512 and AVX2+FMA (x86); other CPUs build a scalar loop, which may be slower
than float32 weights (one warning says so).

Threads: `$TTT_JAX_CPU_THREADS`, default the CPUs this process may run on, at most 8; read once,
when the library is first loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import warnings

import jax
import jaxlib

from ttt_jax.cache import cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "int8_matmul.cc")
TARGET = "ttt_jax_int8_matmul"
THREADS_ENV = "TTT_JAX_CPU_THREADS"
MAX_DEFAULT_THREADS = 8


class KernelUnavailable(RuntimeError):
  """The CPU kernel could not be built or loaded; the message says why."""


def compiler() -> list[str]:
  """The compiler command: `$CXX` (it may hold words, e.g. `ccache g++`), else g++, c++ or
  clang++."""
  for cxx in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
    words = shlex.split(cxx)
    if words and shutil.which(words[0]):
      return words
  raise KernelUnavailable("no C++ compiler found ($CXX, g++, c++ or clang++)")


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _command(cxx: list[str], out: str, extra_flags: tuple[str, ...]) -> list[str]:
  return [*cxx, "-O3", "-march=native", *extra_flags, "-std=c++17", "-shared", "-fPIC",
          "-pthread", f"-I{jax.ffi.include_dir()}", SOURCE, "-o", out]


def library_path(extra_flags: tuple[str, ...] = ()) -> str:
  """The built library for this machine, compiled first where the cache has none.
  `extra_flags` (e.g. `-mno-avx512f`, to build another vector path) go to the compiler."""
  import fcntl  # here: POSIX only, and only building needs it

  cxx = compiler()
  with open(SOURCE, "rb") as f:
    parts = [f.read(), shlex.join(_command(cxx, "", extra_flags)).encode(),
             jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()]
  key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
  out_dir = os.path.join(cache_dir(), "kernels")
  path = os.path.join(out_dir, f"int8_matmul-{key}.so")
  if os.path.exists(path):
    return path
  try:
    os.makedirs(out_dir, exist_ok=True)
    lock = open(path + ".lock", "w")  # noqa: SIM115 (held until the build is in place)
  except OSError as e:
    raise KernelUnavailable(f"cannot write the kernel cache {out_dir}: {e.strerror} "
                            "(set $TTT_JAX_CACHE)") from e
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(path):  # another process may have built it while this one waited
      tmp = f"{path}.{os.getpid()}.tmp"
      proc = subprocess.run(_command(cxx, tmp, extra_flags), capture_output=True, text=True)
      if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise KernelUnavailable(f"compiling {SOURCE} with {shlex.join(cxx)} failed: {tail}")
      os.replace(tmp, path)
  return path


def threads() -> int:
  raw = os.environ.get(THREADS_ENV)
  if raw is None or not raw.strip():
    try:
      available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
      available = os.cpu_count() or 1
    return max(1, min(available, MAX_DEFAULT_THREADS))
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f"${THREADS_ENV}={raw!r}: expected a whole number of threads >= 1")
  return value


@functools.cache
def int8_matmul_target() -> str | None:
  """The registered FFI target of the int8 product, or None (after one warning) where the
  kernel cannot be built or loaded: int8 products are then widened to float32 by XLA (the same
  result, slower than float32 weights)."""
  n_threads = threads()
  try:
    lib = ctypes.CDLL(library_path())
  except (KernelUnavailable, OSError) as e:
    warnings.warn(f"the int8 CPU kernel is unavailable, so int8 weights are widened by XLA "
                  f"instead (the same result, slower than float32 weights): {e}", RuntimeWarning,
                  stacklevel=2)
    return None
  if lib.TttInt8VectorLanes() == 0:
    warnings.warn(f"the int8 CPU kernel has no vector path for this CPU ({platform.machine()}; "
                  "it has AVX2+FMA and AVX-512 ones), so its products may be slower than float32 "
                  "weights", RuntimeWarning, stacklevel=2)
  lib.TttInt8SetThreads.argtypes = [ctypes.c_int]
  lib.TttInt8SetThreads(n_threads)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.TttInt8Matmul), platform="cpu")
  return TARGET
