"""Pure Flax NNX building blocks (no training or data code)."""
