"""Tokenize a corpus into ArrayRecord shards (+ optionally train a BPE tokenizer on it).

  python scripts/prepare_data.py --source books/ --out_dir data/books --train_tokenizer bpe \
      --vocab_size 16384
Sources: embedded | a folder of .txt/.md/.py/.rst | a .jsonl file | tfds:NAME[/CONFIG][:SPLIT].
"""

import os

from ttt_jax.cli import ArgumentParser, positive_int, user_errors
from ttt_jax.data.prepare import prepare

if __name__ == "__main__":
  p = ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--source", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--tokenizer", default="bytes",
                 help="bytes | hf:PATH | bpe:DIR | sp:PATH (ignored with --train_tokenizer)")
  p.add_argument("--train_tokenizer", default="", choices=["", "bpe"])
  p.add_argument("--vocab_size", type=positive_int, default=16384)
  p.add_argument("--val_fraction", type=float, default=0.05)  # its range: data/prepare.py
  p.add_argument("--num_shards", type=positive_int, default=8)
  p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
  p.add_argument("--text_field", default="text")
  p.add_argument("--tfds_data_dir", default="")
  p.add_argument("--force", action="store_true", help="redo even if already prepared")
  args = p.parse_args()

  with user_errors(OSError):  # e.g. an --out_dir that cannot be created: one line naming it
    prepare(args.source, args.out_dir, args.tokenizer, val_fraction=args.val_fraction,
            num_shards=args.num_shards, workers=args.workers, force=args.force,
            text_field=args.text_field, tfds_data_dir=args.tfds_data_dir,
            train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size)
