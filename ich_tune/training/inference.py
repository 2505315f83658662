"""A model's probabilities over batches: validation during training and prediction afterwards compute
them here, so that both feed the model alike. Kept apart from the loop, which prediction does not need
(nor its figures: matplotlib would add about 0.4 s to `predict`'s start)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ich_tune.data.loader import to_float
from ich_tune.training.device import Placement


@torch.no_grad()
def predict_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities and labels over (images, labels) batches, in eval mode."""
    was_training = model.training
    model.eval()
    all_probs, all_labels = [], []
    for images, labels in batches:
        images = to_float(placement.images(images))
        with placement.autocast():
            all_probs.append(torch.sigmoid(model(images).float()).cpu().numpy())
        all_labels.append(labels.numpy())
    model.train(was_training)
    return np.concatenate(all_probs), np.concatenate(all_labels)
