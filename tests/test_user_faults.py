"""Faults a user can cause (issue 14): each is one line naming the path and the cause, exit code 2 (or the
signal's 128 + N), and nothing already on disk is lost.  Real processes and real signals where it matters."""

import errno
import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error, logged_epochs, wait_for
from click.testing import CliRunner
from dataset_writers import phantom, write_nifti
from tiny_runs import tiny_config

import hypersort_core.checkpoint
import hypersort_core.train
from hypersort_core.checkpoint import load_checkpoint
from hypersort_core.cli.main import main as hsort_main
from hypersort_core.data import DataError, PreprocessConfig, TrainingSet, prepare_cases, read_dataset, select_labels
from hypersort_core.data.cache import DamagedArray, load_array, output_file_name, safe_file_stem
from hypersort_core.faults import describe_os_error, os_error_of
from hypersort_core.train import RunFolderGone, fit

TESTS = Path(__file__).parent
TINY_FIT = ["--preset", "small", "--roi", "16", "--base-channels", "4", "--convs-per-level", "1", "--batch-size", "3", "--quiet"]
REAL_SAVE = torch.save


@pytest.fixture
def dataset(synthetic_dataset, one_torch_thread):
    return synthetic_dataset


def hsort(*args, **kwargs):
    return CliRunner().invoke(hsort_main, [str(arg) for arg in args], **kwargs)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "hypersort_core.cli", *map(str, args)]


def cached(cache_dir: Path, pattern: str) -> Path:
    return next(cache_dir.rglob(pattern))


# 1. A full disk under torch's zip writer -------------------------------------------------------------------


class FillsUpAfter(io.RawIOBase):
    """A file whose writes fail with ENOSPC after `room` bytes, as a full disk's do."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save_onto_a_full_disk(payload, handle):
    REAL_SAVE(payload, FillsUpAfter(handle, 2000))  # torch turns the OSError into RuntimeError(... unexpected pos ...)


def test_torch_wraps_a_full_disk_in_a_runtime_error_that_is_recognised(tmp_path):
    with pytest.raises(RuntimeError) as raised, open(tmp_path / "x.pt", "wb") as handle:
        save_onto_a_full_disk({"a": torch.zeros(10_000)}, handle)
    found = os_error_of(raised.value)
    assert found is not None and found.errno == errno.ENOSPC
    assert describe_os_error(found, tmp_path / "x.pt") == f"{tmp_path / 'x.pt'}: no space left on the device"


def test_a_full_disk_under_torchs_zip_writer_ends_fit_with_one_line_and_keeps_the_checkpoint(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(hypersort_core.checkpoint.torch, "save", save_onto_a_full_disk)
    result = hsort("fit", dataset, "--out", run, "--resume", "--epochs", 2, "--quiet", "--no-analyze")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == f"hsort: error: {run / 'checkpoint.pt'}: no space left on the device; the previous checkpoint is intact"
    assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs_as_the_run_folder_is_one_line(dataset, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        process = subprocess.run(
            command("fit", dataset, "--out", disk / "run", *TINY_FIT, "--epochs", 2, "--no-analyze"), capture_output=True, text=True, timeout=600
        )
        assert process.returncode == 2, process.stderr
        assert "Traceback" not in process.stderr
        last = process.stderr.strip().splitlines()[-1]  # 2 MB hold the epoch's outputs, not the 17 MB checkpoint
        assert last == f"hsort: error: {disk / 'run' / 'checkpoint.pt'}: no space left on the device; the previous checkpoint is intact"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# 2. A damaged cache entry is prepared again ---------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_a_truncated_cache_file_is_refused_before_it_is_mapped(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((40, 40, 40), np.float32))
    assert load_array(path).shape == (40, 40, 40)
    truncate(path)
    with pytest.raises(DamagedArray, match="truncated: 200 bytes where its header promises") as error:
        load_array(path)
    assert isinstance(error.value, DataError) and str(error.value).startswith(f"{path}: ")  # one line under every command
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DamagedArray) as error:
        load_array(path)
    assert "allow_pickle" not in str(error.value)


def test_random_crops_refuse_a_truncated_foreground_file_before_mapping_it(dataset, tmp_path, cache_dir):
    """Random crops read each case's foreground voxels: a truncated file is a damaged case, never a bus error."""
    source = read_dataset(dataset)
    prepared = prepare_cases(source, select_labels(source, None), PreprocessConfig(roi=(16, 16, 16), crop="random"), cache_dir, progress=False)
    case = prepared.cases[0]
    truncate(case.foreground_file)
    training_set = TrainingSet(replace(prepared, cases=[case]))
    torch.manual_seed(0)
    with pytest.raises(DamagedArray, match="truncated"):
        for _ in range(20):  # a third of the draws read the foreground file
            training_set[0]


def test_a_cache_entry_truncated_between_runs_is_prepared_again_by_analyze_and_by_fit(dataset, tmp_path, cache_dir):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    truncate(cached(cache_dir, "synth_002*.image.npy"))
    result = hsort("analyze", run, "--quiet", "--pictures", 0)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "synth_002" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "preparing it again from its source files" in warnings[0]
    assert load_array(cached(cache_dir, "synth_002*.image.npy")).shape == (16, 16, 16)

    truncate(cached(cache_dir, "synth_004*.label.npy"))
    result = hsort("fit", dataset, "--out", run, "--resume", "--epochs", 2, "--quiet", "--no-analyze")
    assert result.exit_code == 0, result.output
    assert "synth_004" in result.stderr and "skipped bad case" not in result.output
    assert load_checkpoint(run / "checkpoint.pt")["state"]["unreadable_cases"] == []


def test_a_cached_volume_full_of_nan_whose_source_is_gone_is_named_once_and_left_out(tmp_path, one_torch_thread, cache_dir, capsys):
    data = _synth(tmp_path)
    real_write = hypersort_core.train.write_epoch_outputs

    def poison_after_epoch_1(run_dir, model, state):
        real_write(run_dir, model, state)
        if state.epoch == 1:
            image = cached(cache_dir, "synth_001*.image.npy")
            np.save(image, np.full(np.load(image).shape, np.nan, np.float32))
            (data / "imagesTr" / "synth_001_0000.nii.gz").unlink()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hypersort_core.train, "write_epoch_outputs", poison_after_epoch_1)
        result = fit(data, tmp_path / "run", tiny_config(epochs=3), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "synth_001" in line]
    assert len(lines) == 1 and "NaN" in lines[0] and "left out" in lines[0]
    assert result.epochs_done == 3 and any("synth_001" in str(error) for error in result.bad_cases)


def _synth(tmp_path: Path) -> Path:
    from hypersort_core.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "source", cases=5, size=16, perturbed=0.0, seed=0)


# 3. Signals ----------------------------------------------------------------------------------------------


def signalled_fit(dataset, run, *signals: signal.Signals) -> tuple[int, str]:
    """A long `hsort fit`, sent `signals` at once after its first epoch: its exit code and stderr."""
    process = subprocess.Popen(
        command("fit", dataset, "--out", run, *TINY_FIT, "--epochs", 500, "--checkpoint-every", 1000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(logged_epochs(run)) >= 1 or process.poll() is not None)
        for number in signals:
            process.send_signal(number)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr


def test_a_second_signal_during_the_stop_is_ignored_until_the_checkpoint_is_saved(dataset, tmp_path):
    run = tmp_path / "run"
    # both arrive before the stop is done (the kernel picks their order)
    returncode, stderr = signalled_fit(dataset, run, signal.SIGTERM, signal.SIGINT)
    first = next(number for number in (signal.SIGINT, signal.SIGTERM) if f"hsort: {number.name}: stopping after this step" in stderr)
    second = ({signal.SIGINT, signal.SIGTERM} - {first}).pop()
    assert returncode == 128 + first, stderr  # 130 or 143
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert f"{second.name} ignored" in stderr
    assert load_checkpoint(run / "checkpoint.pt")["state"]["epoch"] >= 1


def test_sigterm_during_training_exits_143_with_a_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    returncode, stderr = signalled_fit(dataset, run, signal.SIGTERM)
    assert returncode == 143, stderr
    assert load_checkpoint(run / "checkpoint.pt")["state"]["epoch"] >= 1


def descendants(pid: int) -> set[int]:
    """Every process below pid (children, their children, ...)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for child in Path("/proc").glob("[0-9]*"):
            try:
                if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.add(int(child.name))
                    frontier.append(int(child.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def slow_to_prepare(tmp_path_factory):
    from hypersort_core.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("many") / "data", cases=60, size=48, perturbed=0.0, seed=0)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_workers_prepare_the_cases_leaves_no_process_behind(slow_to_prepare, tmp_path, signum, code):
    env = {**os.environ, "HSORT_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        command("fit", slow_to_prepare, "--out", tmp_path / "run", *TINY_FIT, "--workers", 2, "--epochs", 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: len(descendants(process.pid)) >= 3 or process.poll() is not None, timeout=120)  # forkserver and 2 workers
        helpers = descendants(process.pid)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in helpers if alive(pid)]


# 4. Image geometry ---------------------------------------------------------------------------------------


def broken_geometry(path: Path, how: str) -> Path:
    image, _ = phantom(0, (12, 12, 12))
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    if how == "zero sform":
        nifti = nib.Nifti1Image(image, affine)
        nifti.set_sform(np.zeros((4, 4)), code=1)
        nifti.set_qform(None, code=0)
    elif how == "nan sform":  # nibabel refuses to write one: patch the header's bytes
        nifti = nib.Nifti1Image(image, affine)
        nifti.set_qform(None, code=0)
        raw = bytearray(nifti.to_bytes())
        raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(bytes(raw)))
        return path
    else:  # 1000 mm voxels
        nifti = nib.Nifti1Image(image, np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti, path)
    return path


@pytest.mark.parametrize("how", ["zero sform", "nan sform", "1000 mm voxels"])
def test_predict_refuses_an_absurd_affine_in_one_line(trained_run, tmp_path, how):
    image = broken_geometry(tmp_path / "in" / "scan.nii.gz", how)
    result = hsort("predict", trained_run, image, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, image)
    assert "affine" in result.stderr or "voxel sizes" in result.stderr
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


def test_predict_refuses_an_image_that_needs_more_memory_than_is_available(trained_run, tmp_path, monkeypatch):
    import hypersort_core.data.volumes

    image, _ = phantom(0, (12, 12, 12))
    path = write_nifti(tmp_path / "in" / "scan.nii.gz", image)
    monkeypatch.setattr(hypersort_core.data.volumes, "available_memory_bytes", lambda: 1000)
    result = hsort("predict", trained_run, path, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, path)
    assert "GiB of memory" in result.stderr


# 5. Long names -------------------------------------------------------------------------------------------


def test_long_names_get_safe_cache_files_and_check_reports_ids_that_cannot_name_outputs(tmp_path, one_torch_thread):
    root = tmp_path / "data"
    long_file = "c" * 213  # + .nii.gz = 220 characters
    rows = ["DataPath\tLabelPath\tcase"]
    for index, case_id in enumerate([long_file, "x" * 250, "..", "plain"]):
        image, label = phantom(index)
        stem = long_file if index == 0 else f"scan{index}"
        write_nifti(root / "images" / f"{stem}.nii.gz", image)
        write_nifti(root / "labels" / f"{stem}.nii.gz", label)
        rows.append(f"images/{stem}.nii.gz\tlabels/{stem}.nii.gz\t{case_id}")
    (root / "data.tsv").write_text("\n".join(rows) + "\n")

    checked = hsort("check", root / "data.tsv", "--quiet")
    assert checked.exit_code == 1, checked.output
    assert "too long for an output file name" in checked.output and "hidden output file" in checked.output
    result = hsort("fit", root / "data.tsv", "--out", tmp_path / "run", *TINY_FIT, "--epochs", 1, "--no-analyze")
    assert result.exit_code == 0, result.output
    assert all(len(path.name.encode()) <= 255 for path in Path(os.environ["HSORT_CACHE"]).rglob("*"))
    assert output_file_name("..") == f"{safe_file_stem('..')}.nii.gz" and not output_file_name(".").startswith(".")


# 6. The run folder ---------------------------------------------------------------------------------------


def test_a_run_folder_deleted_during_fit_stops_with_one_line_and_is_not_recreated(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_write = hypersort_core.train.write_epoch_outputs

    def delete_after_epoch_1(run_dir, model, state):
        real_write(run_dir, model, state)
        if state.epoch == 1:
            shutil.rmtree(run_dir)

    monkeypatch.setattr(hypersort_core.train, "write_epoch_outputs", delete_after_epoch_1)
    result = hsort("fit", dataset, "--out", run, *TINY_FIT, "--epochs", 3, "--no-analyze")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"hsort: error: {run}: the run folder vanished during training")
    assert not run.exists()
    with pytest.raises(RunFolderGone):
        hypersort_core.train._check_run_folder(run)


def test_leftover_temporaries_of_killed_writes_are_removed_on_the_next_start(dataset, tmp_path):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    leftovers = [run / ".checkpoint.pt.abc123.tmp", run / ".latents.csv.xyz.tmp", run / ".progress.png.q.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    assert fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False).epochs_done == 2
    assert not any(path.exists() for path in leftovers)


# 7. Permissions ------------------------------------------------------------------------------------------

SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's file capabilities with setpriv")


@needs_setpriv
def test_fit_into_a_read_only_parent_folder_is_one_line(dataset, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    process = subprocess.run(
        [*SETPRIV, *command("fit", dataset, "--out", parent / "run", *TINY_FIT, "--epochs", 1)], capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert "Traceback" not in process.stderr
    assert lines[-1] == f"hsort: error: {parent / 'run'}: permission denied"


@needs_setpriv
def test_a_run_folder_made_read_only_mid_fit_is_one_line_and_keeps_the_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    script = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import hypersort_core.train
from hypersort_core.cli.main import main
real_write = hypersort_core.train.write_epoch_outputs

def lock_after_epoch_2(run_dir, model, state):
    real_write(run_dir, model, state)
    if state.epoch == 2:  # after epoch 1's checkpoint, before epoch 2's
        os.chmod(run_dir, 0o555)

hypersort_core.train.write_epoch_outputs = lock_after_epoch_2
main(["fit", {str(dataset)!r}, "--out", {str(run)!r}, *{TINY_FIT!r}, "--epochs", "3", "--checkpoint-every", "1"])
"""
    process = subprocess.run([*SETPRIV, sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    os.chmod(run, 0o755)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hsort: error: {run}") and "permission denied" in last
    assert load_checkpoint(run / "checkpoint.pt")["state"]["epoch"] == 1


@needs_setpriv
def test_predict_into_a_read_only_parent_folder_is_one_line(trained_run, tmp_path):
    image, _ = phantom(0, (12, 12, 12))
    path = write_nifti(tmp_path / "in" / "scan.nii.gz", image)
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    process = subprocess.run(
        [*SETPRIV, *command("predict", trained_run, path, "--out", parent / "out", "--quiet")], capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 2, process.stderr
    assert process.stderr.strip() == f"hsort: error: {parent / 'out'}: permission denied"


# The error boundary ---------------------------------------------------------------------------------------


def test_an_unexpected_exception_still_shows_its_traceback_with_a_hint(dataset, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(hypersort_core.train, "prepare_data", bug)
    result = hsort("fit", dataset, "--out", tmp_path / "run", *TINY_FIT, "--epochs", 1)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    assert "this is a bug, please report it" in result.stderr


# Minor: stray foreign warnings -----------------------------------------------------------------------------


def test_a_tab_in_a_case_id_draws_without_a_missing_glyph_warning(tmp_path, recwarn):
    from hypersort_core.latents import plot_latent_map

    plot_latent_map(tmp_path, ["tab\there", "plain"], np.array([[0.1, 0.2], [0.0, 0.0]]), 1)
    assert (tmp_path / "latent_map.png").is_file()
    assert not [warning for warning in recwarn if "missing from" in str(warning.message) or "Glyph" in str(warning.message)]


def test_a_checkpoint_of_another_pickle_protocol_loads_without_torchs_warning(tmp_path, recwarn):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": hypersort_core.checkpoint.FORMAT_VERSION, "x": torch.zeros(2)}, path, pickle_protocol=3)
    assert load_checkpoint(path)["format"] == hypersort_core.checkpoint.FORMAT_VERSION
    assert not [warning for warning in recwarn if "pickle protocol" in str(warning.message)]
