"""Rank 0 fails inside a block the other process waits on, then takes its time to exit (a slow shutdown:
a large model to free, files to close), for tests/test_distributed.py."""

import atexit
import time

from hypersort_core.cli.options import reports_bad_input
from hypersort_core.config import ConfigError
from hypersort_core.distributed import joined


def fail_slowly() -> None:
    atexit.register(time.sleep, 2)
    raise ConfigError("run/checkpoint.pt: no checkpoint to resume from")


@reports_bad_input
def main() -> None:
    with joined("cpu") as world:
        world.on_main(fail_slowly)
    print(f"process {world.rank} went on after process 0 failed")


main()
