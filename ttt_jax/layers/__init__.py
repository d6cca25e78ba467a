"""Pure Flax NNX building blocks (no training or data code).

Importing the package registers the built-in sequence mixers (layers/mixers.py): attention
('full', 'swa') and the TTT variants ('ttt_linear', 'ttt_mlp').
"""

from ttt_jax.layers import attention, ttt_variants  # noqa: F401  (their registrations)
