"""`python -m trainer_accel.bench`: the trainer's loop against a plain PyTorch loop, kept where users know it; the
code is in tools/bench.py."""

import sys

from trainer_accel.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
