"""Phases: each way of training declared in one module (its config keys, the caches it reads, its loss, its gate,
whether its result is a chat model), the registry that lists them (built in, and installed ones through the
`trainer_accel.phases` entry-point group), and pipelines as ordered lists of phases.

Its place in the import order: trainer_accel/layers.py.
"""
