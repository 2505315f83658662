"""Train/validation splits by patient: slices of one exam are near-duplicates, so never by slice."""

from __future__ import annotations

import numpy as np

from ich_tune.data.labels import SHORT_NAMES


def patient_groups(patient_ids: np.ndarray, study_uids: np.ndarray) -> np.ndarray:
    """A group label per slice: PatientID, or the StudyInstanceUID where PatientID is empty.

    Only the slices without a PatientID are prefixed: np.char works string by string, seconds for
    RSNA's 752,807 slices, all of which have one.
    """
    empty = patient_ids == ""
    studies = np.char.add("study:", study_uids[empty].astype(str))
    groups = patient_ids.astype(np.result_type(patient_ids, studies))
    groups[empty] = studies
    return groups


def group_codes(groups: np.ndarray) -> np.ndarray:
    """Each group as its rank among the sorted distinct groups: the one string sort a split needs.

    split_by_group gives the same split for the codes as for the strings, and every later count or
    comparison works on integers.
    """
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def split_by_group(groups: np.ndarray, train_fraction: float, seed: int, folds: int = 0,
                   fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation slices; every group lies wholly on one side.

    With folds == 0, a seeded shuffle of the groups puts `train_fraction` of them in training.
    With folds == k, the shuffled groups are cut into k folds and fold `fold` is validation.
    """
    unique, inverse = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    if folds:
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} is outside 0..{folds - 1}")
        val_groups = np.array_split(order, folds)[fold]
    else:
        n_train = int(round(train_fraction * len(unique)))
        n_train = min(max(n_train, 1), len(unique) - 1) if len(unique) > 1 else len(unique)
        val_groups = order[n_train:]
    is_val = np.zeros(len(unique), dtype=bool)
    is_val[val_groups] = True
    slice_is_val = is_val[inverse]
    return np.flatnonzero(~slice_is_val), np.flatnonzero(slice_is_val)


def describe_split(name: str, labels: np.ndarray, groups: np.ndarray) -> str:
    """One line: counts and label rates, so a reader sees what a split holds."""
    rates = " ".join(f"{c} {r:.1%}" for c, r in zip(SHORT_NAMES, labels.mean(axis=0), strict=True))
    return f"{name:<5} {len(labels):>7} slices {len(np.unique(groups)):>6} patients | {rates}"
