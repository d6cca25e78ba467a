"""Needle-in-a-haystack retrieval per context length and needle depth (ttt_jax/eval/needle.py).

  python scripts/needle.py --workdir runs/swa --ctx 256,512,1k --depths 0,25,50,75,100
  python scripts/needle.py --workdir runs/full --compare runs/swa runs/e2e --ctx 1k,4k
  python scripts/needle.py --workdir runs/tiny --train_task 300 --ctx 256,512

A fact "The secret number of <name> is <number>." sits at each depth of real text (the run's
validation split, or --data SOURCE: embedded, a folder, a .jsonl file, tfds:NAME:SPLIT or a
prepared folder; --split all is the default with --data); the prompt of exactly ctx tokens ends
with the question. Scored by greedy exact match and by the answer's rank among --distractors
other numbers. --train_task STEPS first fine-tunes a copy of each run on the same format with
disjoint names and numbers (into <workdir>/needle_ft, or --ft_workdir) and evaluates the copy.
Writes <evaluated workdir>/eval/needle.json and needle.png; --out DIR writes them (and the
fine-tuned copy, DIR/needle_ft) to DIR instead (with --compare: DIR/<run name>/ per run), for a
read-only run folder.
"""

from __future__ import annotations

import argparse
import os

from ttt_jax.argtypes import positive_float
from ttt_jax.cli import (
  ArgumentParser,
  add_eval_arguments,
  each_run,
  fail,
  non_negative_int,
  positive_int,
  user_errors,
)
from ttt_jax.cli_output import results_dirs
from ttt_jax.data.sources import source_kind
from ttt_jax.eval import needle, needle_run, needle_train, plots


def build_parser() -> ArgumentParser:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_eval_arguments(ap, "evaluate")  # --data: the haystack text
  ap.add_argument("--ctx", default="256,512,1k", help="context lengths (prompt tokens)")
  ap.add_argument("--depths", default="0,25,50,75,100",
                  help="needle depths, percent of the haystack before the needle")
  ap.add_argument("--needles", type=positive_int, default=4, help="prompts per cell")
  ap.add_argument("--distractors", type=int, default=9,
                  help="other numbers scored against the answer (>= 1)")
  ap.add_argument("--seed", type=non_negative_int, default=0,
                  help="chooses names, numbers and haystacks")
  ap.add_argument("--batch_size", type=positive_int, default=None,
                  help="prompts per streamed batch (default eval.batch_size)")
  ap.add_argument("--train_task", type=non_negative_int, default=0, metavar="STEPS",
                  help="fine-tune a copy on the task format for STEPS steps first (0: no)")
  ap.add_argument("--ft_workdir", default=None,
                  help="where the fine-tuned copy goes (default <workdir>/needle_ft)")
  ap.add_argument("--ft_seq_len", type=positive_int, default=None,
                  help="fine-tuning length (default: the run's data.seq_len)")
  ap.add_argument("--ft_batch_size", type=positive_int, default=None,
                  help="fine-tuning batch (default: the run's data.batch_size)")
  ap.add_argument("--ft_lr", type=positive_float, default=None, help="fine-tuning peak lr (default "
                  "train.lr)")
  return ap


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  most = len(needle.partition(needle.EVAL)[1]) - 1  # numbers other than the answer
  if not 1 <= args.distractors <= most:
    fail(f"--distractors {args.distractors} must be in [1, {most}] (the evaluation numbers "
         "other than the answer)", code=2)
  if args.ft_workdir and args.compare:
    fail("--ft_workdir names one fine-tuned copy; with --compare each run's copy goes to "
         "<workdir>/needle_ft", code=2)
  results = []
  with user_errors():
    ctxs, depths = needle.parse_ctxs(args.ctx), needle.parse_depths(args.depths)
    if args.data:  # a bad --data fails before any checkpoint is read
      source_kind(args.data, "--data")
    dirs = results_dirs([args.workdir, *args.compare], args.out)
    ft_dirs = [args.ft_workdir or os.path.join(d if args.out else w, "needle_ft")
               for d, w in zip(dirs, [args.workdir, *args.compare], strict=True)]
    compare_dir = args.out or os.path.join(args.workdir, "eval")
    outputs = [*dirs, compare_dir, *(ft_dirs if args.train_task else ())]
    for (_, run), out, ft_dir in zip(each_run(args, outputs), dirs, ft_dirs, strict=True):
      grid = dict(data=args.data, split=args.split, needles=args.needles,
                  distractors=args.distractors, seed=args.seed, chunk=args.chunk)
      needle_run.check_grid(run, ctxs, depths, **grid)  # before any fine-tuning
      fine_tuned = None
      if args.train_task:
        run, fine_tuned = needle_train.fine_tune(
            run, args.train_task, ft_dir,
            seq_len=args.ft_seq_len, batch_size=args.ft_batch_size, lr=args.ft_lr,
            seed=args.seed, progress=not args.no_progress)
      if not args.out:  # beside the evaluated run: the fine-tuned copy when there is one
        out = os.path.join(run.workdir, "eval")
      res = needle_run.evaluate_run(
          run, ctxs, depths, **grid, batch_size=args.batch_size, progress=not args.no_progress,
          partial=lambda r, ft=fine_tuned, o=out: needle_run.write_results(
              {**r, "fine_tune": ft}, o))
      res["fine_tune"] = fine_tuned
      path = needle_run.write_results(res, out)
      png = plots.plot_needle_heatmap(res, os.path.join(out, "needle.png"))
      print(plots.needle_table(res))
      print(f"wrote {path}, {png}\n")
      results.append(res)
  if len(results) > 1:
    if len({r["prompt_fingerprint"] for r in results}) > 1:
      print("warning: the runs were given different prompts (their tokenizers or haystack "
            "sources differ); the cells are not like for like")
    path = needle_run.write_results(results, compare_dir, "needle_compare.json")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
