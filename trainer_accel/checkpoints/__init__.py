"""Checkpoints: directories written whole or not at all (store), found, checked and loaded; full unsharded state
out of DDP / FSDP / compiled models and back (full_state); the background writer the loop saves through (writer).

May import: the ground floor, data (the tokenizer), models (to rebuild a plain model from a full state) and
devices. Nothing here knows about strategies, phases' inputs or Hugging Face directories.
"""
