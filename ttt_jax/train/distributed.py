"""Process start-up: `jax.distributed.initialize` from the `mesh` config section, and JAX's
persistent compilation cache from `train.compilation_cache`.

Call `initialize(config)` before anything touches devices (the CLI does). On TPU pod slices,
SLURM and Open MPI jobs every argument is auto-detected; elsewhere set `mesh.coordinator_address`,
`mesh.num_processes`, `mesh.process_id` (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import os
import socket

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from ttt_jax.config import ConfigError
from ttt_jax.train import compile_cache

_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def init_kwargs(mesh_cfg: ml_collections.ConfigDict, environ=os.environ) -> dict:
  """Arguments for `jax.distributed.initialize`: config values, else environment variables;
  whatever is still unset is left to JAX's cluster auto-detection."""
  kwargs = {}
  for key, env in _ENV.items():
    value = mesh_cfg.get(key)
    if value in (None, "", -1) and environ.get(env):
      value = environ[env]
    if value in (None, "", -1):
      continue
    kwargs[key] = value if key == "coordinator_address" else int(value)
  return kwargs


def check_host_name(collectives: str | None, platforms: str | None) -> None:
  """In a multi-process job JAX gives its CPU backend collectives, and it starts that backend
  in every job unless JAX_PLATFORMS leaves it out; gloo's collectives (the default) look this
  machine's host name up as the backend starts, where a name that does not resolve stops the
  job with gloo's "rv == 0. -2 vs 0". This says so in one ConfigError, before the coordinator
  is contacted. `collectives`: jax_cpu_collectives_implementation; `platforms`: jax_platforms."""
  if collectives != "gloo" or (platforms and "cpu" not in platforms.split(",")):
    return
  name = socket.gethostname()
  try:
    socket.getaddrinfo(name, None)
  except OSError as err:
    raise ConfigError(
        f"mesh.distributed=True: this machine's host name {name!r} does not resolve "
        f"({err.strerror or err}), and JAX's CPU collectives (gloo) look it up when the job "
        f"starts: add it to /etc/hosts (e.g. '127.0.1.1 {name}') or the cluster's DNS") from None


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Joins the multi-process job when `mesh.distributed` is set. Returns True if it did."""
  if not config.mesh.distributed or jax.distributed.is_initialized():
    return False
  check_host_name(jax.config.jax_cpu_collectives_implementation, jax.config.jax_platforms)
  jax.distributed.initialize(**init_kwargs(config.mesh))
  return True


CACHE_ENV = "TTT_JAX_COMPILATION_CACHE"  # this machine's cache directory ("" = off), any script


def enable_compilation_cache(configured: str, environ=os.environ) -> str | None:
  """Points JAX's persistent compilation cache at a directory; returns the one in use (or None).

  A relaunched or resumed run (and a repeated evaluation) then loads the programs it compiled
  before instead of compiling them again (programs that compile in under a second are not
  stored); entries are keyed by the program, the devices and the compiler flags, so a changed
  config simply compiles anew. The directory is, in order: the one JAX already uses (set by
  JAX_COMPILATION_CACHE_DIR or an earlier call: the first one set stays for the process), the
  TTT_JAX_COMPILATION_CACHE environment variable, then `configured` (`train.compilation_cache`).
  The cache is only a speed-up: a directory that cannot be created or written is reported in
  one warning and the program compiles as before. Its entries are written whole or not at all,
  and one that cannot be loaded is replaced (train/compile_cache.py): a run killed while it
  stores a program does not make every relaunch compile that program again.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    compile_cache.harden(current)
    return current
  raw = environ.get(CACHE_ENV, configured)
  if not raw:
    return None
  path = os.path.abspath(os.path.expanduser(raw))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(13, "not writable")
  except OSError as err:
    source = CACHE_ENV if CACHE_ENV in environ else "train.compilation_cache"
    logging.warning("%s=%r: cannot use it as the compilation cache (%s); compiling without it",
                    source, raw, err.strerror or err)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  compile_cache.harden(path)
  return path


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
