"""Devices and processes: the Accelerator set-up (device choice, gloo on CPUs, FSDP2), hardware facts and
warnings, decisions every process takes together, graceful stops, and the one-run-per-phase-folder lock.

Its place in the import order: trainer_accel/layers.py.
"""
