"""Run one `hsort` command in this process and print, as JSON, the peak resident memory of this process
and of its largest child (DataLoader workers, case-preparing workers), in MiB, and the seconds taken.

Used by tests/test_scale.py: `python peak_memory.py fit DATA --out RUN ...`.
"""

import json
import resource
import sys
import time

from hypersort_core.cli.main import main

if __name__ == "__main__":  # the processes that prepare cases import this module again
    start = time.perf_counter()
    main(sys.argv[1:], standalone_mode=False)
    print(
        json.dumps(
            {
                "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "largest_child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "seconds": time.perf_counter() - start,
            }
        )
    )
