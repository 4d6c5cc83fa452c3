"""`python -m trainer_accel.queue`: the local job queue, kept where users know it; the code is in
experiments/queue.py."""

from trainer_accel.errors import exit_with
from trainer_accel.experiments.queue import main

if __name__ == "__main__":
    exit_with(main)
