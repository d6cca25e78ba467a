"""ttt_jax: long-context language-model pretraining with Test-Time Training in JAX/Flax.

Importing it changes no global setting of JAX or Flax: modules are built inside
`ttt_jax.sharding.lazy_variable_sharding()` where they are built.
"""

__version__ = "0.1.0"
