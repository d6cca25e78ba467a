"""Speed / memory benchmarks (`scripts/bench.py`) and the small-scale E2E reproduction."""
