"""Measuring tools, run by hand and never by training: bench (the loop against a plain PyTorch loop), gpu_check
(every CUDA path on the GPU at hand), prepare_bench and heldout.

Its place in the import order: trainer_accel/layers.py.
"""
