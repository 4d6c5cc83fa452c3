"""trainer_accel: one Accelerate training loop for GPT pretraining and SFT."""

from trainer_accel.dependency_floors import check_floors

__version__ = "0.1.0"

check_floors()  # before any module imports torch or accelerate: a too-old one is named here, not deep in a run
