"""Runs `python scripts/<name>.py ARGS` command lines, each in a process forked from one interpreter
that imported the package and its heavy dependencies (jax, flax, optax, orbax, grain) once.

A fresh interpreter per command line spends seconds importing them; a fork starts with them
loaded. The forked process runs the script as `python` would: `__main__`, `sys.argv`, the
script's folder first on `sys.path`, stdout and stderr to the files asked for, an uncaught
exception printed with its traceback (exit 1), `sys.exit` codes and messages, exit handlers.
The parent never initialises a JAX backend and starts no thread, so forking it is safe.

Run as a program it serves requests: one JSON object per line on stdin, {"script": path,
"args": [...], "stdout": file, "stderr": file, "timeout": seconds}; it answers each with one
line {"returncode": n} on stdout. `ScriptForks` (used by the tests) starts and talks to it.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import traceback


def _run_child(req: dict) -> None:
  """In the forked process: the script's whole run; never returns (whatever fails)."""
  try:
    code = _run_script(req)
  except BaseException:  # noqa: BLE001  (a bad request: never back into the serving loop)
    traceback.print_exc()
    code = 1
  os._exit(code)


def _run_script(req: dict) -> int:
  for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  signal.alarm(int(req["timeout"]))  # the default SIGALRM action ends a hung script
  script = os.path.abspath(req["script"])
  sys.argv = [script, *req["args"]]
  sys.path[0] = os.path.dirname(script)  # where `python script.py` puts the script's folder
  code = 0
  try:
    runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    if e.code is None:
      code = 0
    elif isinstance(e.code, int):
      code = e.code
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException as e:  # noqa: BLE001  (printed as the interpreter prints an uncaught one)
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
      tb = tb.tb_next  # from the script's own frame on: no runpy or server frames
    traceback.print_exception(type(e), e, tb)
    code = 1
  try:
    atexit._run_exitfuncs()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
  return code


def serve() -> None:
  # the modules every script imports; none defines a command-line flag at import
  import flax  # noqa: F401
  import grain  # noqa: F401
  import jax  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401

  import ttt_jax.cli  # noqa: F401
  import ttt_jax.eval.generate  # noqa: F401
  import ttt_jax.interop.hf  # noqa: F401

  for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _run_child(req)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class ScriptForks:
  """`run(script, args) -> subprocess.CompletedProcess` through one serving process."""

  def __init__(self, env: dict, cwd: str, workdir: str):
    self.workdir, self.count = workdir, 0
    self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)

  def run(self, script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    self.count += 1
    out, err = (os.path.join(self.workdir, f"{self.count}.{s}") for s in ("out", "err"))
    req = {"script": script, "args": args, "stdout": out, "stderr": err, "timeout": timeout}
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    reply = self.proc.stdout.readline()  # the server's child ends at `timeout` (SIGALRM)
    if not reply:
      raise RuntimeError(f"the script server stopped (exit {self.proc.wait()})")
    with open(out) as f_out, open(err) as f_err:
      return subprocess.CompletedProcess([script, *args], json.loads(reply)["returncode"],
                                         f_out.read(), f_err.read())

  def close(self) -> None:
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()


if __name__ == "__main__":
  serve()
