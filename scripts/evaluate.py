"""Perplexity per context length and loss per position of trained runs.

  python scripts/evaluate.py --workdir runs/swa --ctx 1k,2k,4k,8k [--max_docs 8] [--step S]
  python scripts/evaluate.py --workdir runs/full --compare runs/swa runs/ttt --ctx 1k,4k,16k
  python scripts/evaluate.py --workdir runs/swa --data books/ --ctx 4k,16k   # any text
  python scripts/evaluate.py --workdir runs/swa --ctx 2k --stride 512   # + strided perplexity

Without --data: the run's own validation split. --data SOURCE (embedded, a folder, a .jsonl file,
tfds:NAME:SPLIT or a prepared folder) is tokenized with the run's tokenizer; --split all (the
default with --data: every document), train or validation (the hash split of data.val_fraction).
Writes <workdir>/eval/results.json and PNGs (compare: <first workdir>/eval/compare_*.png); with
--data they go to <workdir>/eval/data-<source>-<split>/ instead, so results on other text never
replace the run's own (or each other's). --out DIR writes them to DIR instead (with --compare:
DIR/<run name>/ per run, the comparison in DIR), for a run folder that is read-only; a folder that
cannot be written fails in one line before any checkpoint is read.
--stride S (default eval.stride, 0 = off) adds the strided perplexity of the same documents,
whole, at each context length: every token scored once with up to ctx tokens of context, windows
of ctx tokens advancing by S (eval/strided.py); 1 <= S <= every ctx.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ttt_jax.cli import ArgumentParser, add_eval_arguments, each_run, positive_int, user_errors
from ttt_jax.cli_output import results_dirs
from ttt_jax.data.sources import source_kind
from ttt_jax.eval import perplexity, plots, strided
from ttt_jax.eval.generate import trained_context_warning


def output_dir(results: str, data: str | None, split: str | None) -> str:
  """`results` (a run's `W/eval` or --out), or for --data `<results>/data-<source name>-<split>`
  (a readable, file-safe name)."""
  if not data:
    return results
  name = os.path.basename(os.path.normpath(data)) or data
  slug = re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_.") or "source"
  return os.path.join(results, f"data-{slug}-{split or 'all'}")


def main(argv=None) -> None:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_eval_arguments(ap, "evaluate")
  ap.add_argument("--ctx", default=None, help="context lengths, e.g. 1k,2k,4k (default eval.ctx)")
  ap.add_argument("--max_docs", type=positive_int, default=None,
                  help="documents (default eval.max_docs)")
  ap.add_argument("--batch_size", type=positive_int, default=None,
                  help="documents (strided: windows) per streamed batch")
  ap.add_argument("--stride", type=positive_int, default=None,
                  help="also strided perplexity of whole documents, windows advancing by this "
                       "many tokens (default: the run's eval.stride, where 0 = off)")
  args = ap.parse_args(argv)
  with user_errors(memory_hint="fewer documents per streamed batch (--batch_size) or shorter "
                   "chunks (--chunk) fit in less"):
    if args.ctx:  # a bad --ctx, --stride or --data fails before any checkpoint is read
      ctxs = perplexity.parse_ctx_list(args.ctx)
      if args.stride:
        strided.check_stride(args.stride, ctxs)
    if args.data:
      source_kind(args.data, "--data")
    results = []
    dirs = [output_dir(d, args.data, args.split)
            for d in results_dirs([args.workdir, *args.compare], args.out)]
    compare_dir = output_dir(args.out or os.path.join(args.workdir, "eval"), args.data,
                             args.split)
    for (_, run), out in zip(each_run(args, [*dirs, compare_dir]), dirs, strict=True):
      ctxs = perplexity.parse_ctx_list(args.ctx or run.config.eval.ctx)
      warning = trained_context_warning(run.config.model, max(ctxs), "--ctx")
      if warning:
        print(warning, file=sys.stderr)
      partial = os.path.join(out, perplexity.PARTIAL_RESULTS)  # the lengths done, if one fails
      if os.path.exists(partial):  # an earlier evaluation's
        os.remove(partial)
      res = strided.evaluate_run(run, ctxs, stride=args.stride,
                                 option="--stride" if args.stride else "eval.stride",
                                 data=args.data, split=args.split, max_docs=args.max_docs,
                                 chunk=args.chunk, batch_size=args.batch_size,
                                 progress=not args.no_progress,
                                 partial=lambda r, p=partial: perplexity.write_json(r, p))
      path = perplexity.write_json(res, os.path.join(out, "results.json"))
      if os.path.exists(partial):
        os.remove(partial)
      pngs = plots.write_plots([res], out)
      print(plots.ppl_table(res))
      print(f"wrote {path}, {', '.join(pngs)}\n")
      results.append(res)
  if len(results) > 1:
    print(plots.compare_table(results))
    pngs = plots.write_plots(results, compare_dir, prefix="compare_")
    perplexity.write_json(results, os.path.join(compare_dir, "compare.json"))
    print(f"wrote {', '.join(pngs)}")


if __name__ == "__main__":
  main()
