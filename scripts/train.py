"""Pretrain from a config: `scripts/train.py --config configs/pretrain.py:... --workdir W`."""

from ttt_jax.cli import train_main

if __name__ == "__main__":
  train_main()
