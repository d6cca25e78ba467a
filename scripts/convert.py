"""Import a pretrained Llama-family model as a run directory, or export a run to HF format.

  python scripts/convert.py --from hf:DIR --out runs/llama       # config.json + *.safetensors
  python scripts/convert.py --from gguf:FILE --out runs/smollm2  # llama.cpp GGUF (quantized ok)
  python scripts/convert.py --from smollm2-135m --out runs/smollm2   # fetch_model.py + gguf
  python scripts/convert.py --export runs/mine --out hf_dir/     # -> model.safetensors etc.

The run directory (config, Orbax params at step 0, tokenizer.json) works with train.py (as
checkpoint.load_from or resumed), evaluate.py, generate.py and adapt.py. --data_source sets the
run's data.source (what evaluate.py reads), --seq_len its data.seq_len.
"""

from __future__ import annotations

import argparse

from ttt_jax.cli import ArgumentParser, fail, positive_int, user_errors
from ttt_jax.interop import fetch
from ttt_jax.interop.gguf import import_gguf
from ttt_jax.interop.hf import export_hf, import_hf


def main(argv=None) -> None:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--from", dest="src", default=None,
                  help=f"hf:DIR, gguf:FILE or a model name ({', '.join(fetch.MODELS)})")
  ap.add_argument("--export", default=None, help="a run directory to export to HF format")
  ap.add_argument("--out", required=True, help="run directory to write (HF folder for --export)")
  ap.add_argument("--tokenizer", default=None, help="data.tokenizer spec overriding the model's")
  ap.add_argument("--data_source", default="embedded", help="data.source of the new run")
  ap.add_argument("--val_fraction", type=float, default=0.05,
                  help="data.val_fraction of the new run (documents held out for evaluation)")
  ap.add_argument("--seq_len", type=positive_int, default=2048, help="data.seq_len of the run")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step to export")
  ap.add_argument("--overwrite", action="store_true", help="replace --out's checkpoints")
  args = ap.parse_args(argv)
  if (args.src is None) == (args.export is None):
    fail("give exactly one of --from SRC or --export WORKDIR", code=2)
  kw = dict(seq_len=args.seq_len, data_source=args.data_source, val_fraction=args.val_fraction,
            overwrite=args.overwrite)
  with user_errors(fetch.FetchError):
    if args.export:
      export_hf(args.export, args.out, step=args.step)
      return
    kind, sep, path = args.src.partition(":")
    if not sep and kind in fetch.MODELS:
      kind, path = "gguf", fetch.fetch(kind)
    if kind == "hf":
      import_hf(path, args.out, tokenizer=args.tokenizer, **kw)
    elif kind == "gguf":
      if args.tokenizer:
        fail("--tokenizer applies to hf: imports (GGUF files carry their tokenizer)", code=2)
      import_gguf(path, args.out, **kw)
    else:
      fail(f"--from {args.src!r}: expected hf:DIR, gguf:FILE or one of "
           f"{', '.join(fetch.MODELS)}", code=2)


if __name__ == "__main__":
  main()
