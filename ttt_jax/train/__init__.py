"""Training: optimizer, sharding, train state and loop, checkpoints."""
