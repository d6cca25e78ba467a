"""Reading curves: the loss at each position of whole documents (books), read once from start to
end with the model's state carried, in log-spaced position buckets.

  python scripts/read.py --workdir runs/e2e --data books/ --min_len 64k --max_docs 4
  python scripts/read.py --workdir runs/full --compare runs/swa runs/e2e --data books/ \\
      --capacity 128k --max_len 128k

--data SOURCE (embedded, a folder, a .jsonl file, tfds:NAME:SPLIT or a prepared folder) is
tokenized with each run's tokenizer; without it the run's own validation split is read. --split
all (the default with --data), train or validation. Documents shorter than --min_len are skipped
and counted; --max_len truncates. Full attention keeps a KV cache of --capacity tokens (default
max(eval.ctx)) and longer documents are truncated to it; SWA / TTT / E2E read any length in
constant memory. Writes <workdir>/eval/reading.json and reading.png (compare: the first
workdir's eval/compare_reading.json and compare_reading.png, one line per run); --out DIR
writes them to DIR instead (with --compare: DIR/<run name>/ per run), for a read-only run folder.
"""

from __future__ import annotations

import argparse
import os

from ttt_jax.cli import ArgumentParser, add_eval_arguments, each_run, positive_int, user_errors
from ttt_jax.cli_output import results_dirs
from ttt_jax.data.sources import source_kind
from ttt_jax.eval import plots, reading


def main(argv=None) -> None:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_eval_arguments(ap, "read")
  ap.add_argument("--min_len", type=reading.parse_length, default=reading.DEFAULT_MIN_LEN,
                  help="skip (and count) documents with fewer tokens (default 64k)")
  ap.add_argument("--max_len", type=reading.parse_length, default=None,
                  help="truncate documents to this many tokens")
  ap.add_argument("--max_docs", type=positive_int, default=None,
                  help="documents to read (default eval.max_docs)")
  ap.add_argument("--capacity", type=reading.parse_length, default=None,
                  help="full attention's KV capacity (default max(eval.ctx))")
  args = ap.parse_args(argv)
  results = []
  with user_errors():
    if args.data:  # a bad --data fails before any checkpoint is read
      source_kind(args.data, "--data")
    dirs = results_dirs([args.workdir, *args.compare], args.out)
    compare_dir = args.out or os.path.join(args.workdir, "eval")
    for (_, run), out in zip(each_run(args, [*dirs, compare_dir]), dirs, strict=True):
      res = reading.read_run(run, data=args.data, split=args.split, min_len=args.min_len,
                             max_docs=args.max_docs, max_len=args.max_len,
                             capacity=args.capacity, chunk=args.chunk,
                             progress=not args.no_progress)
      path = reading.write_reading(res, os.path.join(out, "reading.json"))
      png = plots.plot_reading([res], os.path.join(out, "reading.png"))
      print(plots.reading_table(res))
      print(f"wrote {path}, {png}\n")
      results.append(res)
  if len(results) > 1:
    out = compare_dir
    warning = plots.tokenizer_warning(results)
    if warning:
      print(warning)
    path = reading.write_reading(results, os.path.join(out, "compare_reading.json"))
    png = plots.plot_reading(results, os.path.join(out, "compare_reading.png"))
    print(f"wrote {path}, {png}")


if __name__ == "__main__":
  main()
