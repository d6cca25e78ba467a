"""Continue a prompt with a trained run (one compiled prefill + decode loop, state carried).

  python scripts/generate.py --workdir runs/swa --prompt "def main(" --max_new_tokens 200 \
      [--temperature 0.8 --top_k 40 --top_p 0.95 --seed 0] [--stop "\\n\\n"] [--seq_len N] \
      [--step S] [--dtype bfloat16] [--no_progress]
  python scripts/generate.py --workdir runs/smollm2 --chat --prompt "What is the capital of France?"

The prompt starts with BOS when the run's tokenizer files say so (add_bos_token; always for runs
trained here) and generation stops at their EOS ids and at any --stop string (repeatable; the
text is cut before it). --chat wraps the prompt as a user message in the model's chat template
(imported instruct models) and prints only the reply. Temperature 0 (the default) is greedy.
The context is the run's data.seq_len unless --seq_len overrides it; a prompt + max_new_tokens
longer than that warns in one line. An empty --prompt (the default) samples from BOS alone and
says so on stderr.
"""

from __future__ import annotations

import argparse
import sys

from ttt_jax.argtypes import float_in, int_in
from ttt_jax.cli import ArgumentParser, fail, positive_int, user_errors
from ttt_jax.config import ConfigError
from ttt_jax.eval.generate import DECODE_DTYPES, generate_text
from ttt_jax.eval.sampling import check_sampling
from ttt_jax.runs.load import load_run


def main(argv=None) -> None:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--workdir", required=True, help="run directory (with checkpoints/)")
  ap.add_argument("--prompt", default="", help="text to continue (empty: BOS alone)")
  ap.add_argument("--chat", action="store_true",
                  help="the prompt is a user message in the model's chat template; print the reply")
  ap.add_argument("--max_new_tokens", type=positive_int, default=200)
  ap.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 = greedy")
  ap.add_argument("--top_k", type=int_in(0), default=0,
                  help="sample from the k most likely (0 = all)")
  ap.add_argument("--top_p", type=float_in(0.0, 1.0, open_low=True), default=1.0,
                  help="sample from the most likely tokens holding this probability (1 = all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--stop", action="append", default=[],
                  help="stop string (repeatable): generation ends before its first occurrence")
  ap.add_argument("--seq_len", type=positive_int, default=None,
                  help="context length (default: the run's data.seq_len)")
  ap.add_argument("--dtype", choices=DECODE_DTYPES, default=None,
                  help="weights for decoding: float32 or bfloat16 (cast once, computing in it), "
                       "or int8 (every matrix stored int8, computing in float32; fastest on "
                       "CPU). Default: the run's")
  ap.add_argument("--step", type=int_in(0), default=None,
                  help="checkpoint step (default: latest)")
  ap.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = ap.parse_args(argv)
  try:
    check_sampling(args.temperature, args.top_k, args.top_p)
  except ConfigError as e:
    fail(str(e), code=2)
  with user_errors():
    run = load_run(args.workdir, args.step)
  if not args.prompt and not args.chat:
    print("note: empty --prompt: generating from BOS alone (an unconditional sample)",
          file=sys.stderr)
  with user_errors():
    text = generate_text(run, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
                         stop=args.stop, seq_len=args.seq_len, progress=not args.no_progress,
                         dtype=args.dtype)
  if not text.strip():
    print(f"note: the model generated only whitespace ({len(text)} characters)",
          file=sys.stderr)
  print(text if args.chat else args.prompt + text)


if __name__ == "__main__":
  main()
