"""`python -m trainer_accel.gpu_check`: every CUDA path on the GPU at hand, kept where users know it; the code is in
tools/gpu_check.py."""

import sys

from trainer_accel.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
