"""Checkpoints, one module per job: the layout of a checkpoint directory and its sidecar (layout: files, format
versions and their upgrades, hashes), writing it whole or not at all and its pointers (writing), finding the one to
resume from (discovery), loading it or an exported best.pt (loading), whether a state fits a model (shapes), the
record beside a best.pt (records); full unsharded state out of DDP / FSDP / compiled models and back
(full_state); the background writer (writer). Nothing here knows about phases, their inputs or Hugging Face
directories.

Its place in the import order: trainer_accel/layers.py.
"""
