"""Hugging Face: a transformers model directory read as a start point (directory), a checkpoint exported as one
(export), and the tokenizer files and chat template an export carries (tokenizer).

May import: the ground floor, data, models (each family's mapping) and checkpoints.
"""
