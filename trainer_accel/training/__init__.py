"""Training: the phases' batch and loss strategies, the check of every input a phase reads, where a phase starts
from (start), and the one Accelerator-wrapped loop.

May import: everything below it (ground floor, data, models, devices, checkpoints, hf, observability).
"""
