"""XLA:CPU flags under which the tests' tiny programs compile fast: unoptimized machine code and,
where this jaxlib still has them, the older fusion emitters (about 30% less time per test file).
Shared by conftest.py (this process and the scripts it launches) and the tests that start
processes with their own XLA_FLAGS. XLA aborts on a flag it does not know, and jaxlib 0.11
dropped the emitter switch, so it is only passed to the jaxlibs that have it."""

from importlib import metadata


def _older_emitters() -> tuple[str, ...]:
  major, minor = (int(x) for x in metadata.version("jaxlib").split(".")[:2])
  return ("--xla_cpu_use_fusion_emitters=false",) if (major, minor) < (0, 11) else ()


# XLA:CPU's older fusion emitters (none on jaxlib 0.11 and later)
OLDER_EMITTERS = _older_emitters()
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                *OLDER_EMITTERS)
