"""`python -m trainer_accel.runs`: runs list / show / lineage / evaluate, kept where users know it; the code is in
experiments/runs.py."""

from trainer_accel.errors import exit_with
from trainer_accel.experiments.runs import main

if __name__ == "__main__":
    exit_with(main)
