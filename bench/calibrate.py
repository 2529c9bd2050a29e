"""Measured times beside the static lower bounds of the same work: how far the GPU is from the issue bound.

    python bench/calibrate.py STATIC_JSON BENCH_JSON...

STATIC_JSON is the report of `hsort bench --static` (one batch size), BENCH_JSON the reports of `hsort bench` on
the GPU.  For every measured row of the batch size the static report bounds, `ours` only: a layer case forward
(the forward launches of the layers of that shape, per layer) or forward+backward (their forward, input-gradient
and weight-gradient launches; the measured first layer also computes the input gradient the step does not
need), and the training step when the static report covers every layer (every launch of the step, head included;
the measured step also runs ReLU, InstanceNorm, the loss and the optimizers, which the bound leaves out).  A measured time can only
be above its bound; the ratio says by how much.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROLES = {"forward": ("forward",), "fwd+bwd": ("forward", "input-grad", "weight-grad")}
SHAPE_FIELDS = ("transposed", "c_in", "c_out", "kernel", "stride", "padding")


def _same_shape(static_shape: dict | None, bench_shape: dict) -> bool:
    return static_shape is not None and static_shape["in_size"] == bench_shape["size"] and all(static_shape[f] == bench_shape[f] for f in SHAPE_FIELDS)


def bound_lines(static: dict, bench: dict) -> list[str]:
    """One line per measured `ours` row of the static report's batch size that the static report bounds."""
    batch, lines = static["settings"]["batch"], []
    shapes = {shape["name"]: shape for shape in bench["layer_shapes"]}
    for row in bench["rows"]:
        figures = static["dtypes"].get(row["dtype"])
        if row["variant"] != "ours" or row["batch"] != batch or row["median_s"] is None or figures is None:
            continue
        device, per_device = next(iter(figures["devices"].items()))
        launches = per_device["rows"]
        if row["section"] == "step":
            if static["settings"]["layers"] is not None:
                continue  # the static report covers only some layers: no bound for the whole step
            bound = per_device["totals"]["step_issue_bound_s"]
        elif row["section"] == "layers" and row["mode"] in ROLES:
            matching = [r for r in launches if r["role"] in ROLES[row["mode"]] and _same_shape(r["shape"], shapes[row["case"]])]
            layers = {r["layer"] for r in matching}
            if not layers:
                continue
            bound = sum(r["issue_bound_s"] for r in matching) / len(layers)
        else:
            continue
        lines.append(
            f"{row['section']} {row['case']} {row['dtype']} B={batch} {row['mode']}: measured "
            f"{row['median_s'] * 1e3:.3g} ms, static issue bound >= {bound * 1e3:.3g} ms on the {device} "
            f"(measured / bound = {row['median_s'] / bound:.2f})"
        )
    return lines


def main(arguments: list[str]) -> int:
    if len(arguments) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    static_path, *bench_paths = map(Path, arguments)
    if not static_path.is_file():
        print(f"{static_path}: not written; no static bounds to compare with")
        return 0
    static = json.loads(static_path.read_text())
    for path in bench_paths:
        if path.is_file():
            for line in bound_lines(static, json.loads(path.read_text())):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
