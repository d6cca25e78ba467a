"""Training: the train state, jitted steps and loop, optimizer, metrics and TensorBoard logs, FLOP
counting, multi-process start-up."""
