"""trainer_accel: one Accelerate training loop for GPT pretraining and SFT."""

__version__ = "0.1.0"
