"""A training process that fails on rank 1 only (an out-of-memory GPU, say), for tests/test_distributed.py."""

import os
import sys

if os.environ["RANK"] == "1":
    print("rank 1 ran out of memory", file=sys.stderr)
    sys.exit(3)
print("rank 0 finished")
