"""The plain-UNet baselines: HyperSORT's loss, real training, and folds that never score a case
with a UNet that saw it."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from hypersort_core import baselines
from hypersort_core.config import ConfigError
from hypersort_core.data import PreparedCase, PreprocessConfig, scored_roi
from hypersort_core.loss import hypersort_loss, segmentation_loss
from hypersort_core.run import load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def prepared_run(trained_run, tmp_path):
    run = load_run(shutil.copytree(trained_run, tmp_path / "run"), "cpu")
    return run, run.prepared()


def test_the_per_sample_loss_is_hypersorts_segmentation_loss():
    logits = torch.randn(3, 2, 8, 8, 8)
    target = torch.randint(0, 2, (3, 8, 8, 8))
    per_sample = segmentation_loss(logits, target)
    for i in range(3):
        alone = hypersort_loss(logits[i : i + 1], target[i : i + 1], torch.zeros(1, 2), l1_weight=1.0)
        assert float(per_sample[i]) == pytest.approx(float(alone.total), rel=1e-5)


def test_training_lowers_the_loss_and_is_reproducible(prepared_run):
    run, prepared = prepared_run
    untrained = baselines.training_loss_scores(prepared, run.config, 0, run.device)
    trained = baselines.training_loss_scores(prepared, run.config, 2, run.device)
    again = baselines.training_loss_scores(prepared, run.config, 2, run.device)
    assert trained.shape == (7,) and trained.mean() < untrained.mean()
    np.testing.assert_array_equal(trained, again)


def test_folds_cover_every_case_once_with_balanced_sizes():
    fold = baselines.fold_of_each_case(11, 4, seed=0)
    assert sorted(np.bincount(fold)) == [2, 3, 3, 3]
    np.testing.assert_array_equal(fold, baselines.fold_of_each_case(11, 4, seed=0))
    with pytest.raises(ConfigError, match="between 2 and 3 folds"):
        baselines.fold_of_each_case(3, 4, seed=0)


def test_test_dice_scores_each_case_with_a_unet_that_never_saw_it(prepared_run, monkeypatch):
    run, prepared = prepared_run
    trained_on, scored_by, kept_alive = {}, {}, []
    train, score = baselines.train_plain_unet, baselines.case_losses

    def recording_train(cases, *args, **kwargs):
        unet = train(cases, *args, **kwargs)
        kept_alive.append(unet)  # so that no later UNet reuses a recorded id
        trained_on[id(unet)] = {cases.dataset.cases[i].case_id for i in cases.indices}
        return unet

    def recording_score(unet, cases, *args):
        scored_by.update({case.case_id: id(unet) for case in cases})
        return score(unet, cases, *args)

    monkeypatch.setattr(baselines, "train_plain_unet", recording_train)
    monkeypatch.setattr(baselines, "case_losses", recording_score)
    scores = baselines.held_out_dice_scores(prepared, run.config, 1, 3, run.device)

    assert len(trained_on) == 3 and set(scored_by) == {case.case_id for case in prepared.cases}
    assert all(case not in trained_on[unet] for case, unet in scored_by.items())
    assert np.all((scores >= 0) & (scores <= 1))


def stored_case(tmp_path, shape) -> PreparedCase:
    """A prepared case on disk whose label is one voxel, at (5, 6, 7)."""
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, dtype=np.uint8)
    label[5, 6, 7] = 1
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "label.npy", label)
    return PreparedCase("case", tmp_path / "image.npy", tmp_path / "label.npy", np.eye(4), shape, np.eye(4))


def test_random_crop_runs_are_scored_on_the_roi_around_the_label(tmp_path):
    case = stored_case(tmp_path, (20, 16, 16))
    config = PreprocessConfig(roi=(8, 8, 8), crop="random")
    image, label = scored_roi(case, config)
    assert image.shape == label.shape == (8, 8, 8)
    assert label[4, 4, 4] == 1 and image[4, 4, 4] == case.load_image()[5, 6, 7]
    stored_image, _ = scored_roi(case, replace(config, crop="label"))
    assert stored_image.shape == (20, 16, 16)
