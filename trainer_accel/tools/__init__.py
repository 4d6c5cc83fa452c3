"""Measuring tools, run by hand and never by training: bench (the loop against a plain PyTorch loop), gpu_check
(every CUDA path on the GPU at hand) and prepare_bench.

May import: anything in the package but the top-level CLIs.
"""
