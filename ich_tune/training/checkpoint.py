"""One self-describing file for every saved model, and the only code that reads one.

train's weights.pt, each trial's checkpoint.pt and a search's best/weights.pt are all the same
dict: the model family and its constructor arguments, the input it takes, its state dict, and, in a
checkpoint to resume from, the training state. So a file alone rebuilds its network; nothing
has to find a config.yaml or Ray's params.json beside it. Loading runs no code from the file
(`weights_only=True`). Plain state dicts written before this format still load, without a spec.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ich_tune.config.schema import ExperimentConfig, ModelConfig
from ich_tune.data.neighbours import input_channels
from ich_tune.errors import UserError
from ich_tune.files import atomic
from ich_tune.models import arguments, build_model

FORMAT = 1
# the files of a checkpoint folder, written by the training loop and read by tracking and --model
CHECKPOINT_FILE = "checkpoint.pt"
VALIDATION_FILE = "validation.npz"  # probabilities, labels and cache rows of the validation there
EXAMPLES_FILE = "examples.png"  # the per-class example grid, every logging.plot_interval steps


def model_spec(config: ExperimentConfig) -> dict:
    """What a saved model must say about itself: its family and arguments, its input, and the whole
    experiment that trained it (prediction decodes new slices with its data settings)."""
    return {"model": {"name": config.model.name, **arguments(config.model)},
            "input": {"channels": config.data.channels, "size": config.data.size,
                      "context": config.data.context, "in_channels": input_channels(config.data)},
            "experiment": dataclasses.asdict(config)}


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    model: dict | None = None  # {"name": family, **arguments}; None in a plain state dict
    input: dict | None = None  # {"channels", "size", "context", "in_channels"}
    experiment: dict | None = None  # the experiment config as a tree
    training: dict | None = None  # optimizer, lr schedule, sampler, RNG, step, history: for a resume
    calibration: dict | None = None  # temperatures and thresholds fitted on validation (evaluation/assess)

    def build(self) -> nn.Module:
        """The network this file describes, with its weights loaded."""
        if self.model is None:
            raise UserError(f"{self.path}: a plain state dict without its model description; give the "
                            "experiment file it was trained with (--config).")
        arguments = {k: v for k, v in self.model.items() if k != "name"}
        config = ModelConfig.family(self.model["name"])(name=self.model["name"], **arguments)
        model = build_model(config, self.input["in_channels"])
        load_state(model, self)
        return model


def save_checkpoint(path: Path, config: ExperimentConfig, model: nn.Module,
                    training: dict | None = None, calibration: dict | None = None) -> None:
    """Write atomically: a reader never sees half a file."""
    state = {"format": FORMAT, **model_spec(config), "state_dict": model.state_dict()}
    for key, value in (("training", training), ("calibration", calibration)):
        if value is not None:
            state[key] = value
    with atomic(path) as partial:
        torch.save(state, partial)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Any saved model of this project; a file that is none gets one message naming it."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"{path}: weights file not found.") from err
    except Exception as err:  # unpickling errors have no common base class
        raise UserError(f"{path}: not a readable PyTorch weights file ({_load_problem(path, err)}); "
                        "give the weights.pt that `train` or a search saved.") from err
    if not isinstance(saved, Mapping):
        raise UserError(f"{path}: expected a saved model (a mapping), found {type(saved).__name__}.")
    if "format" in saved:
        if saved["format"] != FORMAT or not isinstance(saved.get("state_dict"), Mapping):
            raise UserError(f"{path}: a checkpoint of format {saved['format']!r}; this version reads "
                            f"format {FORMAT}.")
        return Checkpoint(path, dict(saved["state_dict"]), saved.get("model"), saved.get("input"),
                          saved.get("experiment"), saved.get("training"), saved.get("calibration"))
    if isinstance(saved.get("model"), Mapping):  # an older training checkpoint: state under "model"
        training = {k: v for k, v in saved.items() if k != "model"}
        return Checkpoint(path, dict(saved["model"]), training=training)
    return Checkpoint(path, dict(saved))


def load_weights(model: nn.Module, path: str | Path) -> int:
    """Copy every tensor of a saved model into `model` (a warm start); returns how many."""
    return load_state(model, load_checkpoint(path))


def load_state(model: nn.Module, checkpoint: Checkpoint) -> int:
    """Every tensor of `checkpoint` into `model`, or a UserError naming the tensor that does not fit
    (a partial load would silently train from a half-random start). An input convolution saved for
    fewer channels is widened (adapt_input_conv), so 2D weights can start a 2.5D model."""
    expected = model.state_dict()
    state = {name: adapt_input_conv(tensor, expected[name]) if name in expected else tensor
             for name, tensor in checkpoint.state_dict.items()}
    _check_matches(state, expected, checkpoint.path)
    model.load_state_dict(state)
    return len(state)


def adapt_input_conv(saved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, C, kh, kw] for an input of k x C channels: the saved weights on the centre
    group of C channels and zeros on the others, so the widened network computes exactly what the
    saved one did on the centre slice. Any other tensor is returned as it is."""
    if not (isinstance(saved, torch.Tensor) and saved.dim() == 4 and target.dim() == 4):
        return saved
    out, width, *kernel = saved.shape
    groups, rest = divmod(target.shape[1], width) if width else (0, 1)
    if [out, *kernel] != [target.shape[0], *target.shape[2:]] or rest or groups < 3 or groups % 2 == 0:
        return saved  # not an input convolution widened by 2k + 1 slices
    widened = torch.zeros(target.shape, dtype=saved.dtype)
    centre = groups // 2 * width
    widened[:, centre:centre + width] = saved
    return widened


def _check_matches(state: Mapping[str, object], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{path}: tensor '{name}' (shape {tuple(tensor.shape)}) is missing; "
                            "the file was saved from a different model configuration.")
        found = state[name]
        if not isinstance(found, torch.Tensor):
            raise UserError(f"{path}: entry '{name}' is a {type(found).__name__}, not a tensor.")
        if found.layout != torch.strided or found.is_quantized or found.is_complex():
            raise UserError(f"{path}: tensor '{name}' is a {found.layout} {found.dtype} tensor; "
                            "expected plain real-valued weights.")
        if found.shape != tensor.shape:
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(found.shape)} in the file "
                            f"but {tuple(tensor.shape)} in the model; check the model's arguments "
                            "(model.hidden_dims, ...) and the input channels.")
    for name in state:
        if name not in expected:
            raise UserError(f"{path}: tensor '{name}' has no place in this model; "
                            "the file was saved from a different model configuration.")


def _load_problem(path: Path, err: Exception) -> str:
    """torch.load's reason in a few words: its own messages run to paragraphs of advice."""
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds more than tensors and plain containers, or is damaged"
    if isinstance(err, OSError) and not isinstance(err, PermissionError):  # seeks past a cut-off end
        return f"truncated or damaged: {err.strerror or err}"
    return str(err).split(". ")[0].splitlines()[0][:120] if str(err) else type(err).__name__
