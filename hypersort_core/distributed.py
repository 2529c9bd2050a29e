"""Training on several processes: torchrun starts them, PyTorch's DistributedDataParallel keeps them in step.

A `World` is who this process is among the others (rank, size) and the few collective operations that
training needs.  With one process every operation is a no-op, so the training loop has a single code
path.  torchrun (or `hsort fit --nproc N`, which starts torchrun) sets RANK, LOCAL_RANK, WORLD_SIZE and
the rendezvous address; `joined()` turns them into a process group: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from hypersort_core.config import ConfigError
from hypersort_core.faults import MainProcessStopped

T = TypeVar("T")

# Rank 0 checks and preprocesses a large dataset while the others wait at the first collective; that
# can take far longer than PyTorch's default of 10 minutes.
TIMEOUT_ENV = "HSORT_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 120


@dataclass(frozen=True)
class World:
    """This process among the training processes: all of them (size), and which one it is."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index on this machine: which GPU to use
    local_size: int = 1  # processes on this machine

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder and prints."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of tensor over all processes (in place, and returned)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: object) -> list:
        """Every process's value, in rank order, on every process."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: object) -> object:
        """Rank 0's value, on every process."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """`work` done by rank 0 while the others wait (picking the checkpoint, writing the run folder), left by all
        processes together: rank 0's result, None on the others.  When it fails on rank 0, the others stop with
        MainProcessStopped instead of failing on the broken connection a moment later, perhaps first, which would
        make torchrun report them."""
        result = None
        if self.is_main:
            try:
                result = work()
            except Exception as error:
                if self.size > 1:
                    self.broadcast(f"process 0 stopped: {error}")
                raise
        failure = self.broadcast(None)
        if failure is not None:
            raise MainProcessStopped(failure)
        return result

    def device(self, name: str) -> torch.device:
        """The device this process trains on: its own GPU (by local rank) on CUDA."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def seed(self, *values: int) -> int:
        """A seed of this process's own, derived from values: random crops differ across ranks."""
        return derived_seed(*values, self.rank)

    def synchronized(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """module wrapped in DistributedDataParallel (which averages its gradients across processes), or module itself."""
        if self.size == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _timeout_minutes() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"${TIMEOUT_ENV} must be a positive number of minutes, got {value!r}")
    return minutes


def derived_seed(*values: int) -> int:
    """A well-mixed seed from several integers (the run's seed, the epoch, a rank...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def world_from_environment() -> World:
    """Who this process is, from the variables torchrun sets (one process when there are none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")), local_size)


@contextlib.contextmanager
def joined(device_name: str) -> Iterator[World]:
    """This process's World, joined to its process group for the duration (left again on exit, except when rank 0
    has stopped: then the process exits without it, see `reports_bad_input`).

    A group that the caller already set up is used as it is and left alone.
    """
    world = world_from_environment()
    if world.size == 1 or dist.is_initialized():
        yield world
        return
    device = world.device(device_name)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"{world.local_size} processes on this machine, but it has {torch.cuda.device_count()} GPUs: start one process per GPU")
        torch.cuda.set_device(device)
    minutes = _timeout_minutes()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=minutes))
    try:
        yield world
    except MainProcessStopped:
        raise  # rank 0 is leaving: tearing the group down against it can abort this process (gloo), so the exit does
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()


def launch(nproc: int, module_arguments: list[str], environment: dict[str, str]) -> int:
    """`torchrun --standalone --nproc_per_node nproc -m module_arguments...`, with environment added, run
    from this process; returns the exit code of the first process that failed (0 when all finished).

    Rank 0 prints to the console, as every rank-0-only message expects; the other processes write into
    log files, shown only when one of them is the first to fail.  torchrun's own tracebacks of a failure
    or of Ctrl-C would only repeat what the processes said, so the launcher stays quiet.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.update(environment)
    logs = Path(tempfile.mkdtemp(prefix="hsort-processes-"))
    others = ",".join(f"{rank}:3" for rank in range(1, nproc))  # stdout and stderr of ranks 1.. into files
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", f"--redirects={others}", f"--log-dir={logs}", "-m", *module_arguments]))
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if rank != 0:  # rank 0's own message is on the console already
            _show_output_of(rank, logs)
        return _shell_exit_code(failure.exitcode)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


def _show_output_of(rank: int, logs: Path, lines: int = 30) -> None:
    """The last lines a failed process wrote to its stderr log."""
    for log in logs.glob(f"*/attempt_*/{rank}/stderr.log"):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"hsort: error: training process {rank} failed; the end of its output:", *tail, sep="\n", file=sys.stderr)


def _shell_exit_code(code: int) -> int:
    """A process killed by signal N reports -N; a shell says 128 + N."""
    return code if code > 0 else 128 - code
