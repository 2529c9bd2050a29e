"""`hsort predict`: a label per image, in that image's own geometry, segmented in the chosen style."""

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from dataset_writers import write_nifti
from scipy.spatial.transform import Rotation

from hypersort_core.cli.predict import predict
from hypersort_core.config import ConfigError
from hypersort_core.run import Run, load_run
from hypersort_core.styles import choose_latent


def oblique_affine(spacing=(1.5, 2.0, 2.5)) -> np.ndarray:
    """Anisotropic voxels, axes stored out of RAS order (swapped and flipped), then rotated about two axes."""
    swapped_and_flipped = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xz", [20, 35], degrees=True).as_matrix() @ swapped_and_flipped @ np.diag(spacing)
    affine[:3, 3] = [12.0, -40.0, 7.5]
    return affine


def ball(shape, affine, radius_mm) -> tuple[np.ndarray, np.ndarray]:
    """A bright ball (radius in world mm, centred off the grid's middle) on a noisy background: image and mask."""
    world = np.indices(shape).reshape(3, -1).T @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ (np.array(shape) * 0.45) + affine[:3, 3]
    mask = (np.linalg.norm(world - centre, axis=1) < radius_mm).reshape(shape)
    noise = np.random.default_rng(0).normal(0, 5, shape)
    return (mask * 100 + noise).astype(np.float32), mask


def write_oblique_image(path, shape, radius_mm):
    """An image whose header keeps distinct qform and sform codes (scanner and aligned)."""
    affine = oblique_affine()
    image, mask = ball(shape, affine, radius_mm)
    nifti = nib.Nifti1Image(image, affine)
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti, path)
    return mask


def run_predict(*args):
    return CliRunner().invoke(predict, [*map(str, args), "--quiet"])


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture
def bright_voxel_model(monkeypatch):
    """Replace the UNet by "the bright voxels are foreground", counting the windows it is shown."""
    windows = []

    def segment_bright_voxels(self, images, latent):
        windows.append(len(images))
        foreground = torch.sigmoid((images - 0.5) * 20)
        return torch.cat([1 - foreground, foreground], dim=1)

    monkeypatch.setattr(Run, "probabilities", segment_bright_voxels)
    return windows


@pytest.mark.parametrize(
    "shape, radius_mm, several_windows", [((24, 20, 18), 10.0, True), ((10, 12, 9), 6.0, False)], ids=["larger than the ROI", "smaller than the ROI"]
)
def test_label_keeps_the_inputs_geometry_and_lands_on_its_object(trained_run, bright_voxel_model, tmp_path, shape, radius_mm, several_windows):
    mask = write_oblique_image(tmp_path / "in" / "ct_0000.nii.gz", shape, radius_mm)
    result = run_predict(trained_run, tmp_path / "in" / "ct_0000.nii.gz", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output

    source, label = nib.load(tmp_path / "in" / "ct_0000.nii.gz"), nib.load(tmp_path / "out" / "ct.nii.gz")
    assert label.shape == source.shape
    np.testing.assert_array_equal(label.affine, source.affine)
    assert label.get_data_dtype() == np.uint8
    assert (int(label.header["qform_code"]), int(label.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(label.get_qform(), source.get_qform())
    assert dice(np.asarray(label.dataobj) == 1, mask) > 0.9
    assert (sum(bright_voxel_model) > 1) == several_windows  # at the run's 2 mm the large image is 20 x 18 x 22 voxels, the ROI 16


def test_real_model_segments_with_the_chosen_latent_only(trained_run, tmp_path, monkeypatch):
    image_file = tmp_path / "in" / "ct_0000.nii.gz"
    write_oblique_image(image_file, (24, 20, 18), 10.0)
    latents_seen = []
    probabilities = Run.probabilities

    def recording(self, images, latent):
        latents_seen.append(np.asarray(latent))
        return probabilities(self, images, latent)

    monkeypatch.setattr(Run, "probabilities", recording)
    case = load_run(trained_run).case_ids[2]
    assert run_predict(trained_run, image_file, "--out", tmp_path / "out", "--case", case).exit_code == 0
    assert len(latents_seen) > 0
    for latent in latents_seen:
        np.testing.assert_array_equal(latent, load_run(trained_run).latent_of(case))
    assert set(np.unique(nib.load(tmp_path / "out" / "ct.nii.gz").dataobj)) <= {0, 1}


def test_folders_and_quoted_globs_with_nnunet_naming(trained_run, tmp_path):
    image = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    write_nifti(tmp_path / "folder" / "liver_7_0000.nii.gz", image)
    write_nifti(tmp_path / "folder" / "plain.nii", image)
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    write_nifti(tmp_path / "globbed" / "a_0000.nii.gz", image)
    write_nifti(tmp_path / "globbed" / "b_0000.nii.gz", image)
    write_nifti(tmp_path / "globbed" / "skipped.nii", image)

    result = run_predict(trained_run, tmp_path / "folder", f"{tmp_path}/globbed/*_0000.nii.gz", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz", "liver_7.nii.gz", "plain.nii.gz"]


def test_two_images_with_one_output_name_are_refused(trained_run, tmp_path):
    image = np.zeros((12, 12, 12), np.float32)
    write_nifti(tmp_path / "in" / "x_0000.nii.gz", image)
    write_nifti(tmp_path / "in" / "x.nii.gz", image)
    assert_one_line_error(run_predict(trained_run, tmp_path / "in", "--out", tmp_path / "out"), tmp_path / "in" / "x_0000.nii.gz")


def write_clusters(run_dir, centroids):
    with open(run_dir / "clusters.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cluster", "size", "z0", "z1", "mean_norm"])
        writer.writerows([[k, 3, *centroid, 0.1] for k, centroid in enumerate(centroids)])


def test_all_clusters_writes_one_folder_per_cluster(trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    write_clusters(run_dir, [(0.0, 0.0), (3.0, -2.0)])
    write_nifti(tmp_path / "in" / "ct_0000.nii.gz", np.random.default_rng(2).normal(size=(12, 12, 12)).astype(np.float32))

    assert run_predict(run_dir, tmp_path / "in", "--out", tmp_path / "out", "--all-clusters").exit_code == 0
    assert sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*.nii.gz")) == ["cluster_0/ct.nii.gz", "cluster_1/ct.nii.gz"]
    assert run_predict(run_dir, tmp_path / "in", "--out", tmp_path / "one", "--cluster", "1").exit_code == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "one" / "ct.nii.gz").dataobj, nib.load(tmp_path / "out" / "cluster_1" / "ct.nii.gz").dataobj)


def test_clusters_before_analysis_and_unknown_clusters_are_one_line_errors(trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    (run_dir / "clusters.csv").unlink(missing_ok=True)
    write_nifti(tmp_path / "ct.nii.gz", np.zeros((12, 12, 12), np.float32))
    result = run_predict(run_dir, tmp_path / "ct.nii.gz", "--out", tmp_path / "out", "--all-clusters")
    assert_one_line_error(result, run_dir / "clusters.csv")
    assert "run hsort analyze first" in result.stderr

    write_clusters(run_dir, [(0.0, 0.0)])
    result = run_predict(run_dir, tmp_path / "ct.nii.gz", "--out", tmp_path / "out", "--cluster", "4")
    assert_one_line_error(result, "--cluster 4")


def nan_image(path):
    image = np.zeros((12, 12, 12), np.float32)
    image[3, 4, 5] = np.nan
    return write_nifti(path, image)


def flat_image(path):
    return write_nifti(path, np.zeros((12, 12), np.float32))


def garbage(path):
    path.write_bytes(b"this is not a NIfTI file")
    return path


@pytest.mark.parametrize("write_bad", [nan_image, flat_image, garbage], ids=lambda f: f.__name__)
def test_bad_image_is_one_line_naming_the_file(trained_run, tmp_path, write_bad):
    bad = write_bad(tmp_path / "bad.nii.gz")
    assert_one_line_error(run_predict(trained_run, bad, "--out", tmp_path / "out"), bad)


def test_missing_image_or_empty_pattern_is_one_line(trained_run, tmp_path):
    assert_one_line_error(run_predict(trained_run, tmp_path / "none.nii.gz", "--out", tmp_path / "out"), tmp_path / "none.nii.gz")
    assert_one_line_error(run_predict(trained_run, f"{tmp_path}/*.nii.gz", "--out", tmp_path / "out"), tmp_path)


def test_latent_choices(trained_run):
    run = load_run(trained_run)
    np.testing.assert_array_equal(choose_latent(run).latent, np.zeros(run.config.model.latent_dim))
    np.testing.assert_array_equal(choose_latent(run, case=run.case_ids[1]).latent, run.latent_of(run.case_ids[1]))
    np.testing.assert_array_equal(choose_latent(run, latent="0.5,-1.25").latent, [0.5, -1.25])
    for wrong in [{"latent": "1,2,3"}, {"latent": "a,b"}, {"case": "no_such_case"}, {"latent": "0,0", "case": run.case_ids[0]}]:
        with pytest.raises(ConfigError):
            choose_latent(run, **wrong)
