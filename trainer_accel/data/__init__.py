"""Data: the tokenizer, the users' file formats, the token caches (their format, writer and sampling by address),
`prepare` (files -> caches) and the built-in demo corpus. Nothing here knows about models, devices, checkpoints or
training.

Its place in the import order: trainer_accel/layers.py.
"""
