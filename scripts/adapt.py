"""Test-time learning (TLM) of a trained run on unlabeled text.

  scripts/adapt.py --workdir W --data prose.txt|folder/ --mode offline|online \
      [--config configs/tlm.py --config.objective=log_perplexity --config.log_p0=auto ...]

Writes the adapter (Orbax) and report.json to W/adapters/<config.name>/ (--out DIR:
DIR/<config.name>/, for a read-only run folder); base weights untouched. A folder that cannot be
written fails in one line before the run is read.
Prints a WARNING line when the selection threshold (config.log_p0) let almost no sample through.
"""

import os

from absl import flags, logging

from ttt_jax.cli import define_config_file, run_absl, user_errors
from ttt_jax.cli_output import check_writable, results_dirs
from ttt_jax.eval import tlm_run
from ttt_jax.eval.perplexity import write_json

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "tlm.py")
config = define_config_file("config", DEFAULT_CONFIG, "TLM config file.")
flags.DEFINE_string("workdir", None, "Trained run (its checkpoints are read, never written).")
flags.DEFINE_string("data", None, "Unlabeled text: a file or a folder of text files.")
flags.DEFINE_enum("mode", None, ["offline", "online"], "Overrides config.mode.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("out", None, "Write the adapter to OUT/<config.name> instead of "
                    "<workdir>/adapters/<config.name>.")
flags.mark_flags_as_required(["workdir", "data"])
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  c = config.value
  if FLAGS.mode:
    c.mode = FLAGS.mode
  with user_errors(FileNotFoundError, ValueError):
    adapters = results_dirs([FLAGS.workdir], FLAGS.out, sub="adapters")[0]
    check_writable([os.path.join(adapters, c.name)], FLAGS.out)
    report = tlm_run.adapt_workdir(FLAGS.workdir, FLAGS.data, c, step=FLAGS.step,
                                   adapters_dir=adapters)
  out = report["adapter_dir"]
  write_json(report, os.path.join(out, "report.json"))
  for line in tlm_run.report_lines(report):
    print(line, flush=True)
  print(f"adapter + report.json: {out}")


if __name__ == "__main__":
  run_absl(main)
