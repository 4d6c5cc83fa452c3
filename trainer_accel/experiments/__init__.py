"""Experiments: the run policy of `run` (runner: one phase, or a pipeline's phases in order, the gate, best.pt),
what a run would do (plan), the eval summary behind every gate (evaluation), best.pt exports, the machine-readable
result, the run registry's CLI (runs), the local job queue (queue) and `doctor`.

Its place in the import order: trainer_accel/layers.py.
"""
