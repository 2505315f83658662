"""Patient-wise splits: no patient on both sides, every slice on exactly one, fixed by the seed.

Slices of one exam are near-duplicates, so a patient on both sides would leak; the synthetic data
has patients with two studies, which a study-wise split would cut in half.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import ensure_cache, open_cache
from ich_tune.data.prepare import load_splits
from ich_tune.data.split import patient_groups, split_by_group
from ich_tune.data.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's ID_ UIDs


def interleaved_groups(count: int, seed: int = 0) -> np.ndarray:
    """`count` patients with 1 to 9 slices each, in a shuffled order, as in a real index."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{k}" for k in range(count)], rng.integers(1, 10, count))
    return rng.permutation(groups)


def assert_split_by_group(groups: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
    assert set(groups[train]).isdisjoint(groups[val])
    both = np.concatenate([train, val])
    assert len(both) == len(groups)
    np.testing.assert_array_equal(np.sort(both), np.arange(len(groups)))


def test_empty_patient_id_falls_back_to_the_study():
    patients = np.array(["P1", "", "", "P1", "", "P2", ""])
    studies = np.array(["S1", "S2", "S2", "S3", "S4", "S5", "P2"])
    groups = patient_groups(patients, studies)
    assert groups[0] == groups[3]  # one patient, two studies
    assert groups[1] == groups[2]  # no PatientID: one group per study
    assert groups[1] != groups[4]
    assert groups[5] != groups[6]  # a study UID that reads like a PatientID is another group
    assert len(set(groups)) == 5


# 40 patients: 30% and 70% of them train; at 0 and 1 each side still keeps one patient.
@pytest.mark.parametrize(("fraction", "n_train"), [(0.0, 1), (0.3, 12), (0.7, 28), (1.0, 39)])
def test_split_keeps_each_patient_on_one_side(fraction, n_train):
    groups = interleaved_groups(40)
    train, val = split_by_group(groups, fraction, seed=1)
    assert_split_by_group(groups, train, val)
    assert len(set(groups[train])) == n_train
    assert len(set(groups[val])) == 40 - n_train


def test_seed_fixes_the_split():
    groups = interleaved_groups(40)
    first = split_by_group(groups, 0.7, seed=5)
    again = split_by_group(groups, 0.7, seed=5)
    other = split_by_group(groups, 0.7, seed=6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(groups[first[1]]) != set(groups[other[1]])


def test_folds_partition_the_patients():
    groups = interleaved_groups(23)
    folds = [split_by_group(groups, 0.7, seed=2, folds=5, fold=k) for k in range(5)]
    owner = np.full(len(groups), -1)
    for k, (train, val) in enumerate(folds):
        assert_split_by_group(groups, train, val)
        assert (owner[val] == -1).all()  # no slice validates in two folds
        owner[val] = k
    assert (owner >= 0).all()
    patients_per_fold = sorted(len(set(groups[val])) for _, val in folds)
    assert patients_per_fold == [4, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="fold 5"):
        split_by_group(groups, 0.7, seed=2, folds=5, fold=5)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    generate(root, studies=8, slices=9, size=64, seed=0, positive_rate=0.4, quirk_rate=0.2)
    cfg = DataConfig(root=str(root), cache_dir=str(tmp_path_factory.mktemp("cache")), full_size=64,
                     workers=1, max_bad_fraction=0.5)
    return ensure_cache(cfg, root), cfg


def test_load_splits_on_real_dicom_keeps_patients_whole(cache_path, said):
    path, cfg = cache_path
    cache = open_cache(path)
    studies_of = defaultdict(set)
    for patient, study in zip(cache.patient_ids, cache.study_uids, strict=True):
        studies_of[patient].add(study)
    assert max(len(s) for p, s in studies_of.items() if p) == 2  # the data hold a two-study patient
    assert not cache.valid.all()  # and a corrupt slice

    splits = load_splits(path, cfg)
    assert set(cache.patient_ids[splits.train]).isdisjoint(cache.patient_ids[splits.val])
    np.testing.assert_array_equal(np.sort(np.concatenate([splits.train, splits.val])),
                                  np.flatnonzero(cache.valid))
    assert [line.split()[:3] for line in said] == [
        ["train", str(len(splits.train)), "slices"], ["val", str(len(splits.val)), "slices"]]
    for line, part in zip(said, (splits.train, splits.val), strict=True):
        assert f"{len(set(cache.patient_ids[part]))} patients" in " ".join(line.split())


def test_load_splits_folds_cover_every_valid_slice_once(cache_path):
    path, cfg = cache_path
    cache = open_cache(path)
    vals = [load_splits(path, DataConfig(folds=3, fold=k)).val for k in range(3)]
    joined = np.concatenate(vals)
    np.testing.assert_array_equal(np.sort(joined), np.flatnonzero(cache.valid))
    for val in vals:
        others = np.setdiff1d(joined, val)
        assert set(cache.patient_ids[val]).isdisjoint(cache.patient_ids[others])
