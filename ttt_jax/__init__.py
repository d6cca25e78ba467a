"""ttt_jax: long-context language-model pretraining with Test-Time Training in JAX/Flax."""

import flax

# Parameters carry logical axis names; shardings are applied by the train step's jit, not at
# variable creation (which would need a mesh in scope for every module constructor).
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
