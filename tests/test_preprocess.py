"""Preprocessing keeps the geometry exact, selects the right classes, crops as configured, and the
cache spares a second run from reading any volume."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from dataset_writers import phantom, write_case, write_nnunet, write_totalsegmentator

from hypersort_core.data import (
    DataError,
    PreprocessConfig,
    TrainingSet,
    prepare_cases,
    read_dataset,
    select_labels,
)

SHAPE = (16, 20, 8)
SPACING = (1.3, 0.9, 2.6)


def oblique_affine() -> np.ndarray:
    """Anisotropic voxels; voxel axis i runs along world -y, j along +x, then rotated and tilted."""
    z, x = np.radians(20), np.radians(10)
    rotate_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rotate_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    swap_and_flip = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotate_z @ rotate_x @ swap_and_flip @ np.diag(SPACING)
    affine[:3, 3] = (5.0, -7.0, 12.0)
    return affine


def to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def intensity_at(world: np.ndarray) -> np.ndarray:
    """An image that is linear in world coordinates, which linear resampling reproduces exactly."""
    return 2 * world[:, 0] - world[:, 1] + 0.5 * world[:, 2]


def oblique_case(root):
    affine = oblique_affine()
    world = to_world(affine, np.indices(SHAPE).reshape(3, -1).T)
    image = intensity_at(world).reshape(SHAPE).astype(np.float32)
    ball_centre = to_world(affine, np.array([[10, 12, 4]]))
    label = (np.linalg.norm(world - ball_centre, axis=1) <= 5).reshape(SHAPE).astype(np.uint8)
    write_case(root, image, label, affine)
    return image, label, affine


def prepare(root, config, cache, labels=None, **options):
    dataset = read_dataset(root)
    return prepare_cases(dataset, select_labels(dataset, labels), config, cache, progress=False, **options)


def test_prepared_grid_maps_onto_the_original_image(tmp_path):
    _, label, affine = oblique_case(tmp_path / "data")
    config = PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(8, 8, 8), clip_percentiles=None)
    case = prepare(tmp_path / "data", config, tmp_path / "cache").cases[0]
    np.testing.assert_allclose(case.original_affine, affine, atol=1e-5)
    assert case.original_shape == SHAPE
    axes = np.abs(case.affine[:3, :3])
    assert np.array_equal(axes.argmax(axis=0), [0, 1, 2]) and np.all(np.diag(case.affine)[:3] > 0)  # RAS
    np.testing.assert_allclose(np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0)), 2.0)

    voxels = np.indices(config.roi).reshape(3, -1).T
    world = to_world(case.affine, voxels)
    source = to_world(np.linalg.inv(case.original_affine), world)  # fractional voxel of the original
    inside = np.all((source >= 0) & (source <= np.array(SHAPE) - 1), axis=1)
    assert inside.sum() > 100
    image = case.load_image().reshape(-1)
    np.testing.assert_allclose(image[inside], intensity_at(world[inside]), rtol=1e-4, atol=1e-3)

    untied = inside & np.all(np.abs(source - np.floor(source) - 0.5) > 1e-3, axis=1)
    nearest = np.round(source[untied]).astype(int)
    prepared_label = case.load_label().reshape(-1)[untied]
    assert prepared_label.any()
    np.testing.assert_array_equal(prepared_label, label[tuple(nearest.T)])


def test_without_resampling_every_prepared_voxel_is_an_original_voxel(tmp_path):
    image, label, _ = oblique_case(tmp_path / "data")
    config = PreprocessConfig(spacing=None, roi=(10, 10, 10), clip_percentiles=None)
    case = prepare(tmp_path / "data", config, tmp_path / "cache").cases[0]
    voxels = np.indices(config.roi).reshape(3, -1).T
    source = to_world(np.linalg.inv(case.original_affine) @ case.affine, voxels)
    np.testing.assert_allclose(source, np.round(source), atol=1e-6)
    source = np.round(source).astype(int)
    inside = np.all((source >= 0) & (source < np.array(SHAPE)), axis=1)
    np.testing.assert_array_equal(case.load_image().reshape(-1)[inside], image[tuple(source[inside].T)])
    np.testing.assert_array_equal(case.load_label().reshape(-1)[inside], label[tuple(source[inside].T)])
    assert not case.load_image().reshape(-1)[~inside].any() and not case.load_label().reshape(-1)[~inside].any()


def test_label_crop_is_centred_on_the_label_bounding_box(tmp_path):
    image, label = phantom(0, shape=(20, 20, 20))  # box at voxels 1..3, 2..4, 3..5
    write_case(tmp_path / "data", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))
    case = prepare(tmp_path / "data", PreprocessConfig(roi=(9, 9, 9)), tmp_path / "cache").cases[0]
    foreground = np.argwhere(case.load_label())
    np.testing.assert_array_equal((foreground.min(axis=0) + foreground.max(axis=0)) / 2, [4, 4, 4])
    assert len(foreground) == 27


def test_image_crop_is_centred_on_the_image(tmp_path):
    image, label = phantom(0, shape=(20, 20, 20))
    write_case(tmp_path / "data", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))
    case = prepare(tmp_path / "data", PreprocessConfig(roi=(10, 10, 10), crop="image"), tmp_path / "cache").cases[0]
    np.testing.assert_allclose(case.affine[:3, 3], [10.0, 10.0, 10.0])  # voxel 5 of 20: the ROI is centred


def test_intensities_are_clipped_to_percentiles_and_scaled_to_unit_range(tmp_path):
    image, label = phantom(0, shape=(12, 12, 12))
    image[0, 0, 0], image[1, 1, 1] = -3000, 3000  # outliers beyond the 0.5 and 99.5 percentiles
    write_case(tmp_path / "data", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))
    config = PreprocessConfig(roi=(12, 12, 12), crop="image")
    prepared = prepare(tmp_path / "data", config, tmp_path / "cache").cases[0].load_image()
    assert prepared.dtype == np.float32
    assert prepared.min() == 0 and prepared.max() == 1
    assert prepared[0, 0, 0] == 0 and prepared[1, 1, 1] == 1
    assert 0 < prepared[6, 6, 6] < 1


def test_selected_labels_become_consecutive_classes(tmp_path):
    root = write_nnunet(tmp_path / "data", n_cases=1, labels={"liver": 1, "spleen": 2, "kidney": 3})
    raw = nib.load(root / "labelsTr" / "case_000.nii.gz").get_fdata()
    config = PreprocessConfig(spacing=None, reorient=False, roi=raw.shape, crop="image")
    spleen_and_liver = prepare(root, config, tmp_path / "cache", "spleen,liver").cases[0].load_label()
    np.testing.assert_array_equal(spleen_and_liver, np.select([raw == 2, raw == 1], [1, 2], 0))
    binary = prepare(root, config, tmp_path / "cache", None).cases[0].load_label()
    np.testing.assert_array_equal(binary, raw > 0)


def test_totalsegmentator_masks_become_classes_in_selection_order(tmp_path):
    root = write_totalsegmentator(tmp_path / "data", n_cases=1, structures=("liver", "spleen"))
    segmentations = root / "s0000" / "segmentations"
    masks = {name: nib.load(segmentations / f"{name}.nii.gz").get_fdata() for name in ("liver", "spleen")}
    config = PreprocessConfig(spacing=None, reorient=False, roi=masks["liver"].shape, crop="image")
    classes = prepare(root, config, tmp_path / "cache", "spleen,liver").cases[0].load_label()
    np.testing.assert_array_equal(classes, masks["spleen"] * 1 + masks["liver"] * 2)
    union = prepare(root, config, tmp_path / "cache", None).cases[0].load_label()
    np.testing.assert_array_equal(union, (masks["spleen"] + masks["liver"]) > 0)


def test_training_items_are_roi_tensors(tmp_path):
    root = write_nnunet(tmp_path / "data", n_cases=2, labels={"liver": 1, "spleen": 2})
    prepared = prepare(root, PreprocessConfig(roi=(8, 8, 8)), tmp_path / "cache", "liver,spleen")
    item = TrainingSet(prepared)[1]
    assert (item["case"], item["index"]) == ("case_001", 1)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 8, 8, 8)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (8, 8, 8)
    assert set(item["label"].unique().tolist()) == {0, 1, 2}


def test_random_crops_are_reproducible_and_favour_the_foreground(tmp_path):
    image = np.zeros((30, 30, 30), dtype=np.int16)
    label = np.zeros((30, 30, 30), dtype=np.uint8)
    label[26:28, 26:28, 26:28] = 1  # a small object in a corner, which uniform crops seldom meet
    write_case(tmp_path / "data", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))
    prepared = prepare(tmp_path / "data", PreprocessConfig(roi=(6, 6, 6), crop="random"), tmp_path / "cache")
    assert prepared.cases[0].load_image().shape == (30, 30, 30)
    training_set = TrainingSet(prepared)

    def draw_labels():
        torch.manual_seed(0)
        return [training_set[0]["label"] for _ in range(60)]

    first, second = draw_labels(), draw_labels()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(crop.shape == (6, 6, 6) for crop in first)
    assert len({tuple(crop.flatten().tolist()) for crop in first}) > 1
    assert sum(bool(crop.any()) for crop in first) >= 10  # expected >= 20: a third centre on foreground


def test_random_crops_pad_volumes_smaller_than_the_roi(tmp_path):
    image, label = phantom(0, shape=(12, 12, 12))
    write_case(tmp_path / "data", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))
    prepared = prepare(tmp_path / "data", PreprocessConfig(roi=(16, 10, 12), crop="random"), tmp_path / "cache")
    assert prepared.cases[0].load_image().shape == (16, 12, 12)
    np.testing.assert_allclose(prepared.cases[0].affine[:3, 3], [-4.0, 0.0, 0.0])  # two voxels of padding before
    assert TrainingSet(prepared)[0]["image"].shape == (1, 16, 10, 12)


def test_second_preparation_reads_no_volume(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "data", n_cases=3)
    config = PreprocessConfig(roi=(8, 8, 8))
    first = prepare(root, config, tmp_path / "cache")

    def fail(*_):
        raise AssertionError("a cached case was read again")

    monkeypatch.setattr(nib, "load", fail)
    second = prepare(root, config, tmp_path / "cache")
    assert second.cache_dir == first.cache_dir
    for before, after in zip(first.cases, second.cases):
        assert after.image_file == before.image_file
        np.testing.assert_array_equal(after.affine, before.affine)
        np.testing.assert_array_equal(after.original_affine, before.original_affine)
    assert not [file for file in first.cache_dir.iterdir() if file.name.startswith(".")]  # no temporary files


def test_changed_settings_or_files_are_prepared_again(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "data", n_cases=3)
    config = PreprocessConfig(roi=(8, 8, 8))
    first = prepare(root, config, tmp_path / "cache")
    assert prepare(root, PreprocessConfig(roi=(6, 6, 6)), tmp_path / "cache").cache_dir != first.cache_dir

    changed = root / "labelsTr" / "case_001.nii.gz"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    loaded = []
    load = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *args, **kwargs: loaded.append(path) or load(path, *args, **kwargs))
    second = prepare(root, config, tmp_path / "cache")
    assert sorted(path.name for path in loaded) == ["case_001.nii.gz", "case_001_0000.nii.gz"]
    assert second.cases[1].image_file != first.cases[1].image_file
    assert second.cases[0].image_file == first.cases[0].image_file


def test_config_round_trips_through_json():
    config = PreprocessConfig(spacing=(1.5, 1.5, 3.0), roi=(96, 96, 64), clip_percentiles=(1.0, 99.0), crop="random")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PreprocessConfig.from_dict(PreprocessConfig(spacing=None, clip_percentiles=None).to_dict()).spacing is None


@pytest.mark.parametrize(
    "options",
    [{"crop": "centre"}, {"roi": (0, 8, 8)}, {"spacing": (2.0, -1.0, 2.0)}, {"clip_percentiles": (99.0, 1.0)}],
)
def test_config_refuses_impossible_settings(options):
    with pytest.raises(ValueError):
        PreprocessConfig(**options)


def test_cases_prepared_by_worker_processes_are_those_prepared_in_this_process(tmp_path, synthetic_dataset):
    """--workers N fills the cache in N processes: the same arrays and geometry, and the same bad cases."""
    config = PreprocessConfig(roi=(16, 16, 16))
    alone = prepare(synthetic_dataset, config, tmp_path / "alone")
    parallel = prepare(synthetic_dataset, config, tmp_path / "parallel", workers=2)
    assert [case.case_id for case in parallel.cases] == [case.case_id for case in alone.cases]
    for a, b in zip(alone.cases, parallel.cases):
        np.testing.assert_array_equal(a.load_image(), b.load_image())
        np.testing.assert_array_equal(a.load_label(), b.load_label())
        np.testing.assert_array_equal(a.affine, b.affine)


def test_a_bad_case_found_by_a_worker_process_is_reported_like_any_other(tmp_path):
    root = tmp_path / "data"
    write_nnunet(root, n_cases=3)
    (root / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a NIfTI file")
    with pytest.raises(DataError, match="case_001"):
        prepare(root, PreprocessConfig(roi=(8, 8, 8)), tmp_path / "cache", workers=2)
    prepared = prepare(root, PreprocessConfig(roi=(8, 8, 8)), tmp_path / "cache", workers=2, skip_bad=True)
    assert [case.case_id for case in prepared.cases] == ["case_000", "case_002"] and len(prepared.bad) == 1


def test_a_cache_folder_that_cannot_be_created_is_a_clear_error(tmp_path, synthetic_dataset):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot hold the prepared cases"):
        prepare(synthetic_dataset, PreprocessConfig(roi=(16, 16, 16)), blocker / "cache")


def test_temporary_files_of_killed_cache_writes_are_removed_once_old(tmp_path, synthetic_dataset):
    config = PreprocessConfig(roi=(16, 16, 16))
    folder = prepare(synthetic_dataset, config, tmp_path / "cache").cases[0].image_file.parent
    abandoned, in_progress = folder / ".synth_000.x.image.npy.ab12cd.tmp", folder / ".synth_001.x.image.npy.ef34gh.tmp"
    for path in (abandoned, in_progress):
        path.write_bytes(b"half a file")
    os.utime(abandoned, (0, 0))
    prepare(synthetic_dataset, config, tmp_path / "cache")
    assert not abandoned.exists() and in_progress.exists()


@pytest.mark.parametrize("shape,sizes", [((17, 20, 9), (1.3, 0.9, 2.6)), ((30, 31, 12), (0.8, 0.8, 1.5)), ((12, 11, 13), (3.1, 0.7, 2.0))])
def test_separable_resampling_is_scipys_trilinear_and_nearest(shape, sizes):
    """The axis-by-axis resampling gives what one scipy.ndimage.affine_transform of the volume gives."""
    from scipy import ndimage

    from hypersort_core.data.preprocess import resample
    from hypersort_core.data.volumes import LabelledVolume

    rng = np.random.default_rng(0)
    image = np.asfortranarray(rng.normal(size=shape).astype(np.float32))[::-1]  # NIfTI's order, flipped as reorienting does
    label = np.asfortranarray(rng.integers(0, 3, shape).astype(np.uint8))[::-1]
    resampled = resample(LabelledVolume(image, label, np.diag([*sizes, 1.0])), (2.0, 2.0, 2.0))
    step = np.full(3, 2.0) / sizes
    matrix = np.linalg.inv(np.diag([*sizes, 1.0])) @ resampled.affine  # new voxel -> old voxel
    np.testing.assert_allclose(np.diag(matrix)[:3], step)
    for volume, result, order in ((image, resampled.image, 1), (label, resampled.label, 0)):
        expected = ndimage.affine_transform(volume, step, matrix[:3, 3], output_shape=result.shape, order=order, mode="nearest")
        np.testing.assert_allclose(result, expected, atol=1e-6)
