"""Experiments: what a run would do (plan), the SFT eval summary and promotion gate (evaluation), the
machine-readable result, the run registry's CLI (runs), the local job queue (queue) and `doctor`.

May import: everything below it, training included. The CLIs at the top level call into here.
"""
