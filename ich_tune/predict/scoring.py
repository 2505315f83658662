"""A trained model scores the CT slices of any folder of DICOM files.

Slices are decoded exactly as the preprocessed cache decodes them (`read_hu`, then `to_channels` at
the experiment's size and channels) and go through the training code's own inference loop
(`predict_batches`), so a model sees at prediction time the pixels it was trained and validated on.
A model trained with `data.context` gets each slice with its neighbours, found as training found
them: the folder's series are rebuilt from the DICOM headers and ordered by z.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ich_tune.config.schema import DataConfig, ExperimentConfig
from ich_tune.data.folder import Folder, FolderImage, decode, readers, scan
from ich_tune.data.labels import CLASSES
from ich_tune.data.neighbours import neighbour_table, stack_neighbours
from ich_tune.data.pool import Runner
from ich_tune.errors import UserError
from ich_tune.progress import bar
from ich_tune.training.device import place
from ich_tune.training.inference import predict_batches


@dataclass
class FolderPrediction:
    """A scored folder: the images that decoded, in series order, and their probabilities."""

    folder: Folder
    images: list[FolderImage]
    probs: np.ndarray  # [len(images), 6], CLASSES order
    unreadable: dict[str, str]  # file -> reason: images whose header or pixels could not be used


def predict_dicom(model: torch.nn.Module, config: ExperimentConfig, dicom_dir: Path,
                  batch_size: int | None = None, workers: int | None = None) -> FolderPrediction:
    """Probabilities for every CT slice under `dicom_dir`, at any depth and under any name.

    Headers and pixels are read by `workers` processes (default: one per core); batches go to the
    model as they are decoded. `batch_size` defaults to the training batch size, which is known to
    fit in memory.
    """
    step = batch_size_for(batch_size, config)
    with readers(workers) as run:
        folder = scan(Path(dicom_dir), run)
        unreadable = dict(folder.unreadable)
        todo = [image for image in folder.images if image.file not in unreadable]
        progress = bar(len(todo), "predict")
        decoded: list[FolderImage] = []

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            stream = _inputs(todo, config.data, run, unreadable, progress)
            while chunk := list(itertools.islice(stream, step)):
                decoded.extend(image for image, _ in chunk)
                images = np.stack([array for _, array in chunk])
                yield torch.from_numpy(images), torch.zeros(len(chunk), 0)  # no labels here

        probs, _ = run_model(model, config, batches())
        progress.close()
    return FolderPrediction(folder, decoded, probs, unreadable)


def _inputs(images: list[FolderImage], cfg: DataConfig, run: Runner, unreadable: dict[str, str],
            progress: tqdm) -> Iterator[tuple[FolderImage, np.ndarray]]:
    """(image, [(2k+1) * C, S, S]) for every image that decodes, series after series.

    Each series is decoded once and its slices stacked with their neighbours by the rules training
    uses (neighbours.py), so a slice that does not decode is nobody's neighbour, here as in the cache.
    """
    k = cfg.context
    for key, members in itertools.groupby(decode(images, cfg.channels, cfg.size, run),
                                          key=lambda pair: pair[0].series_key):
        good = []
        for image, result in members:
            progress.update(1)
            if isinstance(result, str):
                unreadable[image.file] = result
            else:
                good.append((image, result))
        if good and k:
            table = neighbour_table(np.full(len(good), key), np.array([i.z for i, _ in good]),
                                    np.ones(len(good), bool), k)
            stacked = stack_neighbours(np.stack([a for _, a in good]), table)
            good = zip([i for i, _ in good], stacked, strict=True)
        yield from good


def batch_size_for(asked: int | None, config: ExperimentConfig) -> int:
    """The batch size asked for (--batch-size), else training's, which is known to fit in memory."""
    if asked is not None and asked < 1:
        raise UserError(f"--batch-size {asked}: must be at least 1.")
    return asked or config.train.batch_size


def run_model(model: torch.nn.Module, config: ExperimentConfig,
              batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """`predict_batches` on the best device with the training precision; copes with no batches."""
    placement = place(config.train)
    placement.model(model)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # every file unreadable
        return np.empty((0, len(CLASSES))), np.empty((0, len(CLASSES)))
    return predict_batches(model, itertools.chain([first], batches), placement)
