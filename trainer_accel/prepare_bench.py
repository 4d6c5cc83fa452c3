"""`python -m trainer_accel.prepare_bench`: prepare's throughput and memory, kept where users know it; the code is in
tools/prepare_bench.py."""

import sys

from trainer_accel.tools.prepare_bench import main

if __name__ == "__main__":
    sys.exit(main())
