"""Which rows of the global batch each process feeds (multi-host data loading).

The batch's mesh axes (`mesh.rules`' `batch`) decide which rows each device holds. The processes
fall into groups holding the same rows: a group per distinct set of rows, `count` groups, each
holding `data.batch_size / count` rows. Every process of group `index` reads the same windows
(`index::count` of the split, data/pipeline.py), and `jax.make_array_from_process_local_data`
places them at the rows its devices hold. Which window lands in which row does not matter (the
losses are means over the batch); that processes holding the same rows read the same windows
does.
"""

from __future__ import annotations

import jax
import ml_collections

from ttt_jax.config import ConfigError
from ttt_jax.sharding import batch_sharding, make_mesh, rules_from_config


def batch_block(sharding: jax.sharding.NamedSharding, batch_size: int) -> tuple[int, int]:
  """(index, count): this process's group among the `count` groups of processes that hold the
  same rows of `batch_size` under `sharding` (ordered by their first row); a ConfigError naming
  mesh.rules where two processes hold rows that overlap without being the same."""
  held: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((batch_size, 1)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
  groups = sorted({frozenset(rows) for rows in held.values()}, key=min)
  if len({len(g) for g in groups}) > 1 or sum(map(len, groups)) != batch_size:
    raise ConfigError(f"mesh.rules: the processes hold overlapping but different rows of "
                      f"data.batch_size={batch_size} ({len(groups)} sets of rows); map `batch` to "
                      "mesh axes that split the devices of the processes alike")
  return groups.index(frozenset(held[jax.process_index()])), len(groups)


def run_batch_blocks(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`batch_block` of a run's config on all devices (before its Trainer exists)."""
  sharding = batch_sharding(make_mesh(config.mesh), rules_from_config(config))
  return batch_block(sharding, config.data.batch_size)
