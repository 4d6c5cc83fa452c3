"""Devices and processes: the Accelerator set-up (device choice, gloo on CPUs, FSDP2), hardware facts and
warnings, decisions every process takes together, graceful stops, and the one-run-per-phase-folder lock.

May import: the ground floor. Nothing here knows about data, models, checkpoints or training.
"""
