"""Checkpoints: directories written whole or not at all (store), found, checked and loaded; full unsharded state
out of DDP / FSDP / compiled models and back (full_state); the background writer (writer). Nothing here knows about
phases, their inputs or Hugging Face directories.

Its place in the import order: trainer_accel/layers.py.
"""
