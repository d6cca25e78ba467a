"""Bad command lines of every script fail fast: exit status != 0, ONE line on stderr naming the
knob to change (no traceback), and no workdir or output left behind.

Each case runs the real script as `python scripts/<name>.py ...` would, in a process forked from
one interpreter that imported jax and the package once (tests/script_forks.py): all of them fail
before any compute, so a fresh interpreter per case spent most of its time importing. The cases
are independent (pytest -n N).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ttt_jax.data.prepare import prepare

from .script_forks import ScriptForks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/pretrain.py:model=swa,ctx=256"
TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.intermediate_size=64", "--config.data.batch_size=2",
        "--config.train.steps=2"]
SMALL_DOCS = 30  # documents of ~45 bytes each: 1.3K tokens in all

# (script, arguments, text the one-line message must contain). In arguments, {W} is a workdir
# or output path that must not exist afterwards, {D} the folder of the test data made below.
CASES = {
    # train.py: config keys, sections, types
    "unknown_key": ("train", ["--config", PRETRAIN, "--config.train.stepz=5"],
                    "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    "unknown_section": ("train", ["--config", PRETRAIN, "--config.optim.warmup=1"],
                        "unknown config section 'optim'"),
    "section_suggests_key": ("train", ["--config", PRETRAIN, "--config.optim.lr=1e9"],
                             "did you mean 'train.lr'?"),
    "typo_key_suggestion": ("train", ["--config", PRETRAIN, "--config.data.seqlen=128"],
                            "did you mean 'data.seq_len'?"),
    "key_in_wrong_section": ("train", ["--config", PRETRAIN, "--config.train.seq_len=128"],
                             "did you mean 'data.seq_len'?"),
    "wrong_type_int": ("train", ["--config", PRETRAIN, "--config.train.steps=abc"],
                       "'train.steps' takes an int"),
    "wrong_type_float": ("train", ["--config", PRETRAIN, "--config.train.lr=fast"],
                         "'train.lr' takes a float"),
    "wrong_type_bool": ("train", ["--config", PRETRAIN, "--config.checkpoint.resume=maybe"],
                        "'checkpoint.resume' takes a bool"),
    "section_given_a_value": ("train", ["--config", PRETRAIN, "--config.train=5"],
                              "'train' is a section"),
    "bad_choice": ("train", ["--config", PRETRAIN, *TINY, "--config.model.mixer=conv"],
                   "model.mixer='conv'"),
    "impossible_combination": ("train", ["--config", "configs/pretrain.py:model=ttt_linear,"
                                         "ctx=1000", *TINY], "model.ttt.mini_batch_size"),
    # train.py: presets in the config file argument
    "unknown_preset_model": ("train", ["--config", "configs/pretrain.py:model=foo"],
                             "model='foo' unknown"),
    "unknown_preset_scale": ("train", ["--config", "configs/pretrain.py:scale=huge"],
                             "scale='huge' unknown"),
    "bad_ctx": ("train", ["--config", "configs/pretrain.py:ctx=abc"], "ctx='abc'"),
    "unknown_preset_key": ("train", ["--config", "configs/pretrain.py:modle=e2e"], "'modle'"),
    "unknown_e2e_stage": ("train", ["--config", "configs/e2e.py:stage=ext64k"], "stage='ext64k'"),
    "missing_config_file": ("train", ["--config", "configs/nope.py"], "configs/nope.py"),
    # train.py: flags
    "unknown_flag": ("train", ["--config", PRETRAIN, "--workdirr=x"], "workdirr"),
    "missing_workdir": ("train", ["--config", PRETRAIN], "--workdir"),
    # train.py: data, checked before the workdir is created
    "empty_data_folder": ("train", ["--config", PRETRAIN, *TINY,
                                    "--config.data.source={D}/empty"], "data.source="),
    "no_such_source": ("train", ["--config", PRETRAIN, *TINY, "--config.data.source={D}/nope"],
                       "no such file or folder"),
    "zero_validation_docs_prepared": ("train", ["--config", PRETRAIN, *TINY,
                                                "--config.data.source={D}/prepared_no_val"],
                                      "0 validation documents"),
    "zero_validation_docs_raw": ("train", ["--config", PRETRAIN, *TINY,
                                           "--config.data.source={D}/small",
                                           "--config.data.val_fraction=0.0"],
                                 "raise data.val_fraction"),
    "seq_len_longer_than_documents": ("train", ["--config", PRETRAIN, *TINY,
                                                "--config.data.source={D}/small",
                                                "--config.data.val_fraction=0.5",
                                                "--config.data.pack_docs=False"],
                                      "data.seq_len=256"),
    "seq_len_longer_than_split": ("train", ["--config", PRETRAIN, *TINY,
                                            "--config.data.source={D}/small"],
                                  "lower data.seq_len"),
    "min_doc_len_too_large": ("train", ["--config", PRETRAIN, *TINY,
                                        "--config.data.source={D}/small",
                                        "--config.data.val_fraction=0.5",
                                        "--config.data.min_doc_len=1000"], "data.min_doc_len"),
    "batch_larger_than_split": ("train", ["--config", "configs/pretrain.py:model=swa,ctx=64",
                                          *TINY, "--config.model.window=64",
                                          "--config.data.source={D}/small",
                                          "--config.data.val_fraction=0.5",
                                          "--config.data.batch_size=64"], "data.batch_size=64"),
    "load_from_missing": ("train", ["--config", PRETRAIN, *TINY,
                                    "--config.checkpoint.load_part=params",
                                    "--config.checkpoint.load_from={D}/nope"],
                          "checkpoint.load_from"),
    # the other entry points
    "evaluate_no_workdir": ("evaluate", ["--workdir", "{W}"], "no such directory"),
    "evaluate_bad_ctx": ("evaluate", ["--workdir", "{W}", "--ctx", "1k,lots"], "ctx="),
    "evaluate_bad_chunk": ("evaluate", ["--workdir", "{W}", "--chunk", "0"], "--chunk"),
    "evaluate_no_such_data": ("evaluate", ["--workdir", "{W}", "--data", "{D}/nope"],
                              "--data="),
    "evaluate_bad_split": ("evaluate", ["--workdir", "{W}", "--data", "{D}/small", "--split",
                                        "test"], "--split"),
    "evaluate_zero_stride": ("evaluate", ["--workdir", "{W}", "--stride", "0"], "--stride"),
    "evaluate_stride_over_ctx": ("evaluate", ["--workdir", "{W}", "--ctx", "256,1k", "--stride",
                                              "512"], "--stride 512 is larger than ctx 256"),
    "read_no_such_data": ("read", ["--workdir", "{W}", "--data", "{D}/nope"], "--data="),
    "read_bad_min_len": ("read", ["--workdir", "{W}", "--min_len", "lots"], "--min_len"),
    "generate_no_workdir": ("generate", ["--workdir", "{W}"], "no such directory"),
    "generate_zero_tokens": ("generate", ["--workdir", "{W}", "--max_new_tokens", "0"],
                             "--max_new_tokens"),
    "generate_negative_temperature": ("generate", ["--workdir", "{W}", "--temperature", "-1"],
                                      "--temperature"),
    "needle_no_workdir": ("needle", ["--workdir", "{W}"], "no such directory"),
    "needle_bad_ctx": ("needle", ["--workdir", "{W}", "--ctx", "1k,lots"], "--ctx '1k,lots'"),
    "needle_bad_depths": ("needle", ["--workdir", "{W}", "--depths", "0,150"],
                          "--depths '0,150': expected a comma list of percentages"),
    "needle_no_distractors": ("needle", ["--workdir", "{W}", "--distractors", "0"],
                              "--distractors 0"),
    "needle_negative_seed": ("needle", ["--workdir", "{W}", "--seed", "-1"], "--seed"),
    "needle_too_many_distractors": ("needle", ["--workdir", "{W}", "--distractors", "99999"],
                                    "--distractors 99999 must be in [1, "),
    "adapt_unknown_key": ("adapt", ["--workdir", "{W}", "--data", "{D}/small", "--config.lrr=1"],
                          "did you mean 'lr'?"),
    "adapt_wrong_type": ("adapt", ["--workdir", "{W}", "--data", "{D}/small",
                                   "--config.lr=abc"], "'lr' takes a float"),
    "adapt_bad_mode": ("adapt", ["--workdir", "{W}", "--data", "{D}/small", "--mode", "both"],
                       "--mode"),
    "prepare_no_such_source": ("prepare_data", ["--source", "{D}/nope", "--out_dir", "{W}"],
                               "no such file or folder"),
    "prepare_empty_source": ("prepare_data", ["--source", "{D}/empty", "--out_dir", "{W}",
                                              "--workers", "1"], "no non-empty documents"),
    "prepare_bad_val_fraction": ("prepare_data", ["--source", "{D}/small", "--out_dir", "{W}",
                                                  "--val_fraction", "1.5"], "--val_fraction"),
    "bench_unknown_kind": ("bench", ["--quick", "--kinds", "rnn", "--out_dir", "{W}"],
                           "--kinds 'rnn'"),
    "bench_wrong_type": ("bench", ["--quick", "--repeats", "x", "--out_dir", "{W}"],
                         "--repeats"),
    "reproduce_unknown_scale": ("reproduce_e2e", ["--scale", "huge", "--workdir", "{W}",
                                                  "--out", "{W}/r.md"], "scale='huge'"),
    "reproduce_unknown_kind": ("reproduce_e2e", ["--kinds", "rnn", "--workdir", "{W}",
                                                 "--out", "{W}/r.md"], "--kinds 'rnn'"),
    "demo_unknown_flag": ("demo", ["--workdir", "{W}", "--steps", "3"], "--steps"),
    # the scripts' own numeric flags: one range check each (ttt_jax/argtypes.py)
    "needle_nan_depths": ("needle", ["--workdir", "{W}", "--depths", "nan"], "--depths 'nan'"),
    "evaluate_negative_step": ("evaluate", ["--workdir", "{W}", "--step", "-1"],
                               "--step: expected an integer >= 0"),
    "compile_check_negative_batch": ("compile_check", ["--batch_size", "-3", "--json",
                                                       "{W}/c.json"], "--batch_size=-3"),
    "compile_check_nan_timeout": ("compile_check", ["--timeout", "nan", "--json", "{W}/c.json"],
                                  "--timeout=nan"),
    "bench_negative_repeats": ("bench", ["--quick", "--repeats", "-1", "--out_dir", "{W}"],
                               "--repeats: expected an integer >= 1"),
    "bench_negative_warmup": ("bench", ["--quick", "--warmup", "-2", "--out_dir", "{W}"],
                              "--warmup: expected an integer >= 0"),
    "reproduce_negative_budget": ("reproduce_e2e", ["--budget_minutes", "-1", "--workdir", "{W}",
                                                    "--out", "{W}/r.md"], "--budget_minutes"),
    "reproduce_nan_budget": ("reproduce_e2e", ["--budget_minutes", "nan", "--workdir", "{W}",
                                               "--out", "{W}/r.md"], "--budget_minutes"),
    "compare_speed_zero_repeats": ("compare_speed", ["--repeats", "0", "--json", "{W}/s.json"],
                                   "--repeats: expected an integer >= 1"),
    "prepare_zero_workers": ("prepare_data", ["--source", "{D}/small", "--out_dir", "{W}",
                                              "--workers", "0"], "--workers"),
    "bench_out_dir_a_file": ("bench", ["--quick", "--out_dir", "{D}/small/doc00.txt"],
                             "doc00.txt: a file is there, not a folder"),
    "compare_speed_unknown_baseline": ("compare_speed", ["--baseline", "no-such-rev-123",
                                                         "--json", "{W}/s.json"],
                                       "--baseline no-such-rev-123: no such git revision"),
    "compare_decode_bad_variant": ("compare_decode", ["--variants", "ours;gpt"],
                                   "variant 'gpt': expected llama, ours or ours-1t"),
    "compare_decode_zero_rounds": ("compare_decode", ["--rounds", "0"], "--rounds"),
    "compare_decode_no_run": ("compare_decode", ["--workdir", "{W}", "--variants", "ours"],
                              "no such directory"),
    "needle_zero_ft_lr": ("needle", ["--workdir", "{W}", "--ft_lr", "0"], "--ft_lr"),
    "convert_export_out_a_file": ("convert", ["--export", "{W}", "--out", "{D}/small/doc00.txt"],
                                  "doc00.txt: a file is there, not a folder"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """empty/ (no text files), small/ (30 short documents), prepared_no_val/ (prepared from
  small/ with a validation fraction so small that no document lands in validation)."""
  root = tmp_path_factory.mktemp("cli_data")
  (root / "empty").mkdir()
  (root / "empty" / "notes.bin").write_bytes(b"\x00\x01")
  small = root / "small"
  small.mkdir()
  for i in range(SMALL_DOCS):
    (small / f"doc{i:02d}.txt").write_text(f"document number {i} with a little text in it\n")
  messages = []
  prepare(str(small), str(root / "prepared_no_val"), val_fraction=1e-4, num_shards=1,
          echo=messages.append)
  assert any("validation split is EMPTY" in m for m in messages), messages
  return str(root)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  server = ScriptForks(env, ROOT, str(tmp_path_factory.mktemp("script_output")))
  yield server
  server.close()


@pytest.fixture
def run_script(forks):
  """`run_script(script, args) -> CompletedProcess` of `python scripts/<script>.py args`."""
  return lambda script, args: forks.run(os.path.join(ROOT, "scripts", f"{script}.py"), args)


def last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_in_one_line(case, data_dir, tmp_path, run_script):
  script, args, needle = CASES[case]
  workdir = str(tmp_path / "w")
  if script == "train" and "--workdir" not in " ".join(args) and case != "missing_workdir":
    args = [*args, "--workdir", workdir]
  args = [a.replace("{W}", workdir).replace("{D}", data_dir) for a in args]
  out = run_script(script, args)
  line = last_line(out.stderr)
  assert out.returncode != 0, (case, out.stdout[-2000:], out.stderr[-2000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert needle in line, (needle, line, out.stderr[-2000:])
  assert f"{script}.py: error: " in line or line.startswith(f"{script}: "), line
  assert not os.path.exists(workdir), os.listdir(workdir)


def test_prepare_warns_about_empty_validation(data_dir, tmp_path, run_script):
  out = run_script("prepare_data", ["--source", os.path.join(data_dir, "small"), "--out_dir",
                                    str(tmp_path / "p"), "--val_fraction", "0.0001",
                                    "--workers", "1"])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "warning: the validation split is EMPTY: 0 of 30 documents" in out.stdout, out.stdout


def test_a_forked_run_ends_as_the_interpreter_would(tmp_path, forks):
  """The forked runs report what `python script.py` reports: exit codes, sys.exit messages, an
  uncaught exception's traceback, output of both streams and of exit handlers."""
  script = tmp_path / "probe.py"
  script.write_text(
      "import atexit, sys\n"
      "atexit.register(lambda: print('exit handler ran'))\n"
      "print('out', sys.argv[1:]); print('err', file=sys.stderr)\n"
      "if sys.argv[1] == 'raise': raise ValueError('boom')\n"
      "if sys.argv[1] == 'message': sys.exit('probe: error: bad')\n"
      "sys.exit(int(sys.argv[1]))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for arg, code in (("raise", 1), ("message", 1), ("3", 3), ("0", 0)):
    forked = forks.run(str(script), [arg])
    real = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True,
                          env=env, timeout=60)
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout) == (
        code, f"out ['{arg}']\nexit handler ran\n"), (forked, real)
    assert forked.stderr == real.stderr and forked.stderr.startswith("err\n"), (forked, real)
    assert ("Traceback" in forked.stderr) == (arg == "raise"), forked.stderr


def test_a_case_run_forked_reports_as_one_run_in_a_fresh_interpreter(data_dir, tmp_path,
                                                                    run_script):
  args = ["--config", PRETRAIN, "--config.train.stepz=5", "--workdir", str(tmp_path / "w")]
  forked = run_script("train", args)
  real = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  assert forked.returncode == real.returncode != 0
  assert last_line(forked.stderr) == last_line(real.stderr), (forked.stderr, real.stderr)
