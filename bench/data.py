"""The data benchmark: how long `hsort check` and `hsort fit`'s preparation take on full-size CTs, and
how much memory each process needs.

It writes N CT-like volumes (default 512 × 512 × 300 int16, 0.8 × 0.8 × 1.5 mm, gzip NIfTI, as
TotalSegmentator's CTs): a body of soft tissue in air, two lungs of air inside it, and three organs
labelled 1-3 in an nnU-Net dataset.  Then, for each --workers value, each phase runs in a fresh
process of its own, so that its peak memory is its own:

  check            `hsort check`: every case read and checked, the findings cached
  check + prepare  what `hsort fit` does before training: each case checked and prepared (reoriented,
                   resampled to 2 mm, clipped, cropped, cached) in one read
  second run       the same again with unchanged files: nothing is read (the `cases read` column)

Reported per phase: seconds, seconds per case, the projection to TotalSegmentator's 1,204 CTs, and the
peak resident memory (VmHWM) of the main process and of its largest worker (sampled while it runs).  One table, and every
figure in OUT/data.json.

    python bench/data.py                                  # 8 CTs of 512 × 512 × 300, workers 0 and 2
    python bench/data.py --cases 3 --shape 64,64,40 --workers 0   # a dry run in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TOTALSEGMENTATOR_CASES = 1204
SPACING_MM = (0.8, 0.8, 1.5)
AIR_HU, LUNG_HU, TISSUE_HU, NOISE_HU = -1000, -850, 40, 12
ORGANS = {  # label value: (centre, radii) in fractions of the field of view, and the organ's HU
    1: ((-0.12, 0.02, -0.05), (0.18, 0.16, 0.20), 100),
    2: ((0.20, 0.08, -0.05), (0.07, 0.08, 0.12), 110),
    3: ((0.10, -0.15, -0.20), (0.05, 0.06, 0.10), 150),
}
PHASES = ("check", "check + prepare", "second run")


def main() -> None:
    args = parse_arguments()
    if args.phase:
        print(json.dumps(run_phase(args.phase, Path(args.data), Path(args.cache), args.workers[0])))
        return
    out = Path(args.out)
    data = write_dataset(out / f"ct-{'x'.join(map(str, args.shape))}-{args.cases}", args.cases, tuple(args.shape))
    rows = []
    for workers in args.workers:
        check_cache, fit_cache = out / f"cache-check-{workers}", out / f"cache-fit-{workers}"
        for cache in (check_cache, fit_cache):
            shutil.rmtree(cache, ignore_errors=True)
        for phase, cache in zip(PHASES, (check_cache, fit_cache, fit_cache)):
            rows.append({"phase": phase, "workers": workers, **measure(phase, data, cache, workers, args.cases)})
            print(format_row(rows[-1]), file=sys.stderr)
    report = {"cases": args.cases, "shape": args.shape, "spacing_mm": SPACING_MM, "data": str(data), "rows": rows, "machine": machine()}
    (out / "data.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"\nevery figure: {out / 'data.json'}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=lambda text: [int(side) for side in text.split(",")], default=[512, 512, 300], help="X,Y,Z voxels")
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[0, 2], help="comma-separated --workers values")
    parser.add_argument("--out", default="bench/out/data")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_dataset(root: Path, cases: int, shape: tuple[int, int, int]) -> Path:
    """An nnU-Net dataset of `cases` CT phantoms, written once (dataset.json last marks it complete)."""
    import nibabel as nib

    if (root / "dataset.json").is_file():
        return root
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([-SPACING_MM[0], -SPACING_MM[1], SPACING_MM[2], 1.0])  # LPS, as DICOM-converted CTs
    for index in range(cases):
        image, label = ct_phantom(shape, np.random.default_rng(index))
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"ct_{index:04d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"ct_{index:04d}.nii.gz")
        print(f"wrote case {index + 1} of {cases}", file=sys.stderr)
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def ct_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT (body, lungs, organs, noise) and its uint8 label, on open grids: no coordinate volumes."""
    from hypersort_core.data.synth import inside_ellipsoid

    grid = [((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5).reshape([-1 if a == axis else 1 for a in range(3)]) for axis, size in enumerate(shape)]
    jitter = rng.uniform(-0.02, 0.02, 3)
    body = np.broadcast_to((grid[0] / 0.42) ** 2 + (grid[1] / 0.32) ** 2 <= 1, shape)  # an elliptic cylinder, head to feet
    image = np.where(body, np.int16(TISSUE_HU), np.int16(AIR_HU))
    for side in (-0.18, 0.18):
        image[inside_ellipsoid(grid, np.array([side, 0.0, 0.3]) + jitter, np.array([0.13, 0.18, 0.3])) & body] = LUNG_HU
    label = np.zeros(shape, np.uint8)
    for value, (centre, radii, hu) in ORGANS.items():
        organ = inside_ellipsoid(grid, np.array(centre) + jitter, np.array(radii))
        image[organ], label[organ] = hu, value
    image += (rng.standard_normal(shape, dtype=np.float32) * NOISE_HU).astype(np.int16)
    return image, label


def measure(phase: str, data: Path, cache: Path, workers: int, cases: int) -> dict:
    """One phase in a fresh process: its seconds, cases read and peak memory."""
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--cache", str(cache), "--workers", str(workers)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    seconds_per_case = result["seconds"] / cases
    return {**result, "seconds_per_case": seconds_per_case, "projected_hours_for_1204_cases": seconds_per_case * TOTALSEGMENTATOR_CASES / 3600}


def run_phase(phase: str, data: Path, cache: Path, workers: int) -> dict:
    """check_dataset as `hsort check` (phase "check") or `hsort fit` (the others) calls it."""
    import hypersort_core.check as check
    from hypersort_core.config import TrainConfig

    read = []
    run_in_processes = check.run_in_processes
    check.run_in_processes = lambda function, jobs, *rest: read.append(len(jobs)) or run_in_processes(function, jobs, *rest)
    prepare = None if phase == "check" else TrainConfig.from_preset("paper").preprocess
    with WorkerPeaks() as workers_peaks:
        start = time.perf_counter()
        report = check.check_dataset(data, cache_dir=cache, workers=workers, prepare=prepare)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cases_read": sum(read),
        "exit_code": report.exit_code,
        "main_peak_mib": peak_kib(os.getpid()) / 1024,  # not getrusage: its peak carries over from the process that started this one
        "largest_worker_peak_mib": max(workers_peaks.peaks.values()) / 1024 if workers and workers_peaks.peaks else None,
    }


class WorkerPeaks:
    """The peak resident memory (VmHWM, KiB) of every process descended from this one, sampled from /proc
    while the block runs: getrusage cannot see the workers, which are the forkserver's children."""

    def __init__(self, every_seconds: float = 0.05):
        self.every_seconds, self.peaks, self.done = every_seconds, {}, threading.Event()

    def __enter__(self) -> WorkerPeaks:
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.done.set()
        self.thread.join()

    def sample(self) -> None:
        while not self.done.wait(self.every_seconds):
            for pid in descendants(os.getpid()):
                if (peak := peak_kib(pid)) is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0))


def descendants(root: int) -> set[int]:
    """The processes whose chain of parents reaches `root` (from /proc/*/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


COLUMNS = ("phase", "workers", "cases read", "s", "s/case", "1,204 cases (h)", "peak MiB main", "peak MiB worker")


def format_row(row: dict) -> str:
    worker = "-" if row["largest_worker_peak_mib"] is None else f"{row['largest_worker_peak_mib']:.0f}"
    cells = (
        row["phase"],
        row["workers"],
        row["cases_read"],
        f"{row['seconds']:.1f}",
        f"{row['seconds_per_case']:.2f}",
        f"{row['projected_hours_for_1204_cases']:.2f}",
        f"{row['main_peak_mib']:.0f}",
        worker,
    )
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def format_table(report: dict) -> str:
    shape = "×".join(map(str, report["shape"]))
    lines = [
        f"{report['cases']} CTs of {shape} int16 (gzip), {report['machine']['cpus']} CPUs, load average {report['machine']['load_average'][0]:.1f}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    return "\n".join(lines + [format_row(row) for row in report["rows"]])


if __name__ == "__main__":  # worker processes import this module again
    main()
