"""Command-line plumbing shared by scripts/: flag parsing and one-line errors.

Every bad input a user can type (an unknown or misspelt config key or section, a value of the
wrong type, an unknown preset in `--config file.py:key=value`, a missing path, a data set-up
that cannot train) ends the program with a non-zero exit status and ONE line on stderr,
`<script>: error: <message naming the knob>`, never a traceback. Config flags are parsed by
ml_collections inside absl's flag parsing, before `main` runs, so `run_absl` parses them itself
and translates what goes wrong there (`flag_error_message`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import runpy
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ttt_jax.argtypes import non_negative_int, positive_int  # noqa: F401 (the scripts' types)
from ttt_jax.cli_output import check_writable
from ttt_jax.config import ConfigError, base_config
from ttt_jax.data.dataset import ALL
from ttt_jax.data.sources import SOURCE_HELP, SPLITS
from ttt_jax.runs.checkpoint import CheckpointError
from ttt_jax.runs.diskspace import DiskFull
from ttt_jax.runs.load import Run, load_run
from ttt_jax.runs.workdir import WorkdirBusy
from ttt_jax.train import distributed
from ttt_jax.train.devicememory import DeviceMemoryFull, is_out_of_memory, out_of_memory_message
from ttt_jax.train.loop import NonFiniteError, train_and_evaluate

# What a user can cause and fix: reported in one line. Anything else keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, WorkdirBusy, NonFiniteError, DiskFull,
               DeviceMemoryFull)

_CONFIG_FLAGS: dict[str, str | None] = {}  # config flag name -> default config file


def prog_name() -> str:
  return os.path.basename(sys.argv[0]) or "ttt_jax"


def one_line(text: str) -> str:
  return " ".join(str(text).split())


def fail(message: str, code: int = 1) -> NoReturn:
  """Exits with `code` after printing `<script>: error: <message>` (one line) to stderr."""
  print(f"{prog_name()}: error: {one_line(message)}", file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def user_errors(*more: type[BaseException], memory_hint: str = "") -> Iterator[None]:
  """Turns USER_ERRORS (and `more`) raised in the block into `fail(message)`, and XLA's
  out-of-memory error into one line ending in `memory_hint` (what makes the script's programs
  hold less)."""
  try:
    yield
  except (*USER_ERRORS, *more) as e:
    fail(str(e) or type(e).__name__)
  except jax.errors.JaxRuntimeError as e:
    if not is_out_of_memory(e):
      raise
    fail(out_of_memory_message(e, memory_hint))


# -- argparse ---------------------------------------------------------------------------------
def usage_error(message: str) -> NoReturn:
  """argparse's `error`, in one line: `<script>: error: <message> (see --help)`, status 2."""
  fail(f"{message} (see --help)", code=2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line usage errors."""

  def error(self, message: str) -> NoReturn:
    usage_error(message)


def add_eval_arguments(ap: argparse.ArgumentParser, verb: str) -> None:
  """The options scripts/evaluate.py and scripts/read.py share (`verb`: what the command does to
  the text): the run(s), the text read, the chunk, the checkpoint step, the progress bars."""
  ap.add_argument("--workdir", required=True, help="run directory (with checkpoints/)")
  ap.add_argument("--data", default=None,
                  help=f"{verb} this text, not the run's validation split: {SOURCE_HELP}")
  ap.add_argument("--split", choices=(ALL, *SPLITS), default=None,
                  help="documents of the source (default: all with --data, else validation)")
  ap.add_argument("--chunk", type=positive_int, default=None,
                  help="streamed chunk (default eval.chunk)")
  ap.add_argument("--step", type=non_negative_int, default=None,
                  help="checkpoint step (default: latest)")
  ap.add_argument("--compare", nargs="*", default=[], help=f"more workdirs to {verb} and overlay")
  ap.add_argument("--out", default=None,
                  help="write the results here instead of <workdir>/eval (several runs: "
                       "OUT/<run name>); the run's own folder is then only read")
  ap.add_argument("--no_progress", action="store_true", help="no progress bars")


def each_run(args: argparse.Namespace,
             outputs: Sequence[str] = ()) -> Iterator[tuple[str, Run]]:
  """(workdir, loaded run) of --workdir (at --step) and of each --compare workdir (latest).
  Before the first run is loaded, every workdir must exist and every folder of `outputs` be
  writable (one line naming it otherwise), so no run's work is lost to a later one's typo."""
  for flag, workdir in [("--workdir", args.workdir), *(("--compare", w) for w in args.compare)]:
    if not os.path.isdir(workdir):
      raise ConfigError(f"{flag} {workdir}: no such directory")
  check_writable(outputs, getattr(args, "out", None))
  for workdir in [args.workdir, *args.compare]:
    # this machine's cache (default or TTT_JAX_COMPILATION_CACHE), not the training machine's
    distributed.enable_compilation_cache(base_config().train.compilation_cache)
    yield workdir, load_run(workdir, args.step if workdir == args.workdir else None)


def run_argparse_main(main: Callable[[list[str]], object],
                      build_parser: Callable[[], argparse.ArgumentParser],
                      argv: list[str] | None = None) -> None:
  """Runs `main(argv)` of a module that builds its own argparse parser: the command line is
  checked first with one-line usage errors, USER_ERRORS become one line too."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  parser.error = usage_error
  parser.parse_args(argv)
  with user_errors():
    main(argv)


# -- absl + ml_collections config flags -------------------------------------------------------
def define_config_file(name: str, default: str | None, help_string: str):
  """`config_flags.DEFINE_config_file` (locked) whose parse errors `run_absl` reports in one
  line."""
  _CONFIG_FLAGS[name] = default
  try:  # a default config file is parsed right here, with the overrides found in sys.argv
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:  # noqa: BLE001 (explained in one line below, or re-raised)
    message = flag_error_message(e, sys.argv[1:])
    if message is None:
      raise
    fail(message, code=2)


def run_absl(main: Callable, argv: list[str] | None = None) -> None:
  """`absl.app.run(main)` with one-line errors for every flag and config problem."""
  app.run(main, argv=argv, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run`, with `fail(one line)` instead of a traceback or usage."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (explained in one line below, or re-raised)
    message = flag_error_message(e, argv)
    if message is None:
      raise
    fail(message, code=2)
  for name in _CONFIG_FLAGS:  # a missing config file only fails when the config is first used
    try:
      flags.FLAGS[name].value.keys()
    except OSError as e:
      fail(config_file_problem(argv, name) or str(e).splitlines()[0], code=2)
  return rest


def _causes(err: BaseException) -> Iterator[BaseException]:
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    yield err
    err = err.__cause__ or err.__context__


def flag_error_message(err: BaseException, argv: list[str]) -> str | None:
  """One line for an exception raised while absl parsed `argv`; None if it is not a usage
  problem (then the traceback is worth seeing)."""
  config_errors = [c for c in _causes(err) if isinstance(c, ConfigError)]
  if config_errors:  # the innermost: ml_collections re-raises it with a traceback in the text
    return str(config_errors[-1])
  for name in _CONFIG_FLAGS:
    message = config_file_problem(argv, name) or override_problem(argv, name)
    if message:
      return message
  if isinstance(err, flags.Error):
    return str(err).strip().splitlines()[0]
  return None


def config_spec(argv: list[str], name: str) -> str | None:
  """The value of `--name` (`file.py[:args]`) in argv, else the flag's default."""
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
    if m:
      if m.group(1):
        return m.group(2)
      return argv[i + 1] if i + 1 < len(argv) else None
  return _CONFIG_FLAGS.get(name)


def config_file_problem(argv: list[str], name: str) -> str | None:
  spec = config_spec(argv, name)
  if spec is None:
    return None
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    return f"--{name}={spec}: no such config file {path!r}"
  return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """What `--config=spec` gives: `get_config(arg)` of the file (ConfigError for bad args)."""
  path, *arg = spec.split(":", 1)
  return runpy.run_path(path)["get_config"](*arg)


def overrides(argv: list[str], name: str) -> list[tuple[str, str | None]]:
  """(dotted key, value or None) of every `--name.key=value` / `--name.key value` in argv."""
  out = []
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?(no)?{re.escape(name)}\.([^=]+)(=(.*))?", arg, flags=re.DOTALL)
    if not m:
      continue
    if m.group(1):
      value = "false"
    elif m.group(3):
      value = m.group(4)
    elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      value = argv[i + 1]
    else:
      value = None
    out.append((m.group(2), value))
  return out


def leaf_paths(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(c.keys()):
    v = c[k]
    out += leaf_paths(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [
        f"{prefix}{k}"]
  return out


def suggest(key: str, prefix: str, options, full_paths=()) -> str:
  """'; did you mean X?' for an unknown dotted `key` whose part after `prefix` is not among
  `options`: the closest option there, else a key elsewhere with the same last name, or ''."""
  part = key[len(prefix):].split(".")[0]
  close = difflib.get_close_matches(part, list(options), n=1, cutoff=0.6)
  if close:
    rest = key[len(prefix) + len(part):]
    return f"; did you mean {prefix + close[0] + rest!r}?"
  by_leaf = {p.rsplit(".", 1)[-1]: p for p in full_paths}
  close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.8)
  return f"; did you mean {by_leaf[close[0]]!r}?" if close else ""


_PARSERS = {bool: lambda v: {"true": True, "false": False, "1": True, "0": False}[v.lower()],
            int: int, float: float}


def override_problem(argv: list[str], name: str) -> str | None:
  """One line about the first `--name.key=value` that names no key of the config or whose
  value does not parse as the key's type; None if all are fine."""
  spec = config_spec(argv, name)
  items = overrides(argv, name)
  if spec is None or not items:
    return None
  try:
    config = load_config_file(spec)
  except ConfigError as e:
    return str(e)
  except Exception:  # noqa: BLE001 (the original parse error is reported instead)
    return None
  everything = leaf_paths(config)
  for key, value in items:
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      here = ".".join(parts[:i])
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"--{name}.{key}: config key {here!r} is a value, not a section "
                f"(it has no key {part!r})")
      if part not in node:
        kind = "key" if i == len(parts) - 1 else "section"
        where = f" of section {here!r}" if here else ""
        hint = suggest(key, f"{here}." if here else "", node.keys(), everything)
        listed = "" if hint else f"; {'keys' if here else 'sections and keys'}{where}: " \
            f"{', '.join(sorted(node.keys()))}"
        return f"--{name}.{key}: unknown config {kind} {'.'.join(parts[:i + 1])!r}{hint}{listed}"
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
      return (f"--{name}.{key}: config key {key!r} is a section; set one of its keys, e.g. "
              f"--{name}.{key}.{sorted(node.keys())[0]}=...")
    parse = _PARSERS.get(type(node))
    if parse is not None and value is not None:
      try:
        parse(value)
      except (ValueError, KeyError):
        kind = type(node).__name__
        return (f"--{name}.{key}={value}: config key {key!r} takes {'an' if kind == 'int' else 'a'}"
                f" {kind} (default {node!r})")
  return None


# -- entry points -----------------------------------------------------------------------------
def train_main(argv=None) -> None:
  """scripts/train.py and the `ttt-train` console script."""
  config = define_config_file(
      "config", None, "Config file, e.g. configs/pretrain.py:model=e2e,scale=tiny,ctx=2k")
  workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(_):
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      with user_errors():
        distributed.initialize(config.value)  # before anything touches devices
        distributed.enable_compilation_cache(config.value.train.compilation_cache)
        train_and_evaluate(config.value, workdir.value)  # Ctrl-C: saved, then interrupted
    except KeyboardInterrupt:
      fail("interrupted (Ctrl-C); rerun the same command to resume from the run's last "
           "complete checkpoint", code=130)

  run_absl(main, argv)
