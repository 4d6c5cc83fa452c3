"""Hugging Face: a transformers model directory read as a start point (directory), a checkpoint exported as one
(export), and the tokenizer files and chat template an export carries (tokenizer).

Its place in the import order: trainer_accel/layers.py.
"""
