"""bench/data.py: one tiny run end to end; the second run reads no case."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SCRIPT = Path(__file__).parents[1] / "bench" / "data.py"


def test_the_data_benchmark_times_each_phase_and_its_second_run_reads_nothing(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "2", "--shape", "40,36,24", "--workers", "0", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "data.json").read_text())
    assert [(row["phase"], row["cases_read"], row["exit_code"]) for row in report["rows"]] == [("check", 2, 0), ("check + prepare", 2, 0), ("second run", 0, 0)]
    assert all(row["seconds"] > 0 and row["main_peak_mib"] > 0 for row in report["rows"])
    image = nib.load(Path(report["data"]) / "imagesTr" / "ct_0000_0000.nii.gz")
    label = np.asarray(nib.load(Path(report["data"]) / "labelsTr" / "ct_0000.nii.gz").dataobj)
    assert image.get_data_dtype() == np.int16 and image.shape == (40, 36, 24)
    assert set(np.unique(label)) == {0, 1, 2, 3}  # the three organs
    assert "| second run | 0 | 0 |" in result.stdout
