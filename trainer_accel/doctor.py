"""`python -m trainer_accel.doctor`: checks of the machine, caches, disk, wandb and write access, kept where users
know it; the code is in experiments/doctor.py."""

from trainer_accel.errors import exit_with
from trainer_accel.experiments.doctor import main

if __name__ == "__main__":
    exit_with(main)
