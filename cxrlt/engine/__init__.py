"""Training and evaluation: ONE loop for every variant and both stages (`loop`), resumable training
state (`checkpointing`), the model a variant trains (`build`), and per-image prediction and
evaluation (`evaluation`)."""

from .build import build_model, init_backbone, label_embeddings_for, resolve_init
from .checkpointing import TRAIN_STATE
from .evaluation import evaluate, make_dataset, per_image, predict, resolve_device, trained_image_size, unit_of
from .live import read_history
from .loop import train

__all__ = ["TRAIN_STATE", "build_model", "evaluate", "init_backbone", "label_embeddings_for", "make_dataset",
           "per_image", "predict", "read_history", "resolve_device", "resolve_init", "train", "trained_image_size", "unit_of"]
