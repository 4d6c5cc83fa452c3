"""`python -m trainer_accel.compare`: runs' event logs -> loss curves and a table, kept where users know it; the code
is in observability/compare.py."""

from trainer_accel.errors import exit_with
from trainer_accel.observability.compare import main

if __name__ == "__main__":
    exit_with(main)
