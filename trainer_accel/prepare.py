"""`python -m trainer_accel.prepare`: your files -> caches, kept where users know it; the code is in data/prepare.py."""

from trainer_accel.data.prepare import main
from trainer_accel.errors import exit_with

if __name__ == "__main__":
    exit_with(main)
