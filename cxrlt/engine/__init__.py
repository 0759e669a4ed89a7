"""Training and evaluation: ONE loop for every variant and both stages (`loop`), resumable training
state (`checkpointing`), the model a variant trains (`build`), and per-image prediction and
evaluation (`evaluation`)."""

from cxrlt.engine.build import build_model, init_backbone, label_embeddings_for, resolve_init
from cxrlt.engine.checkpointing import TRAIN_STATE
from cxrlt.engine.evaluation import evaluate, make_dataset, per_image, predict, unit_of
from cxrlt.engine.live import read_history
from cxrlt.engine.loop import train

__all__ = ["TRAIN_STATE", "build_model", "evaluate", "init_backbone", "label_embeddings_for", "make_dataset",
           "per_image", "predict", "read_history", "resolve_init", "train", "unit_of"]
