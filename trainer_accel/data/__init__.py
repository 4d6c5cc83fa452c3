"""Data: the tokenizer, the users' file formats, the token caches (their format, writer and sampling by address),
`prepare` (files -> caches) and the built-in demo corpus.

May import: the ground floor (errors, paths, config, fsio, versions, faults). Nothing here knows about models,
devices, checkpoints or training (docs/architecture.md).
"""
