"""A run directory's records: the checkpoint store, fresh start / resume / warm start, the workdir
lock, disk-space checks, and opening a trained run read-only (`load_run`)."""
