"""The model a variant trains: its architecture, label-text embeddings (text-query heads) and, for
CheXFusion's stage 2, the stage-1 backbone it starts from."""

from __future__ import annotations

from pathlib import Path

import torch

from cxrlt.artefact.checkpoint import load_artefact
from cxrlt.config import VariantConfig
from cxrlt.models import create_model


def resolve_init(init_from: str, models_dir: str | Path = "models") -> Path:
    """A stage-1 artefact named by variant (models/<name>), by folder, or by registry tag."""
    for cand in (Path(models_dir) / init_from, Path(init_from)):
        if (cand / "artefact.json").exists():
            return cand
    if ":" in init_from:
        from cxrlt.registry.store import model_path
        return model_path(init_from)
    raise FileNotFoundError(f"stage-1 artefact {init_from!r} not found (looked in {models_dir}/ and as a "
                            "folder); train that variant first or give a registry tag")


def init_backbone(model, init_dir: Path) -> None:
    """Load a stage-1 artefact's backbone into `model` strictly (same backbone architecture required).

    A view-specific model (`view_backbones` separate/split) starts every part (shared stem, frontal
    and lateral branches) from a shared stage-1 backbone; from a stage 1 that is view-specific in the
    same way it takes the branches and the view classifier as they are.
    """
    stage1 = load_artefact(init_dir)
    src, dst = stage1.model.config, model.config
    if src.backbone != dst.backbone:
        raise ValueError(f"stage-1 artefact {init_dir} has backbone {src.backbone!r}, this model {dst.backbone!r}")
    state = stage1.model.backbone.state_dict()
    if src.view_backbones == "shared" and dst.view_backbones != "shared":
        model.backbone.load_shared_state(state)
        return
    same = src.view_backbones == dst.view_backbones and (
        dst.view_backbones != "split" or src.split_stage == dst.split_stage)
    if not same:
        raise ValueError(f"stage-1 artefact {init_dir} has view_backbones={src.view_backbones!r} "
                         f"(split_stage {src.split_stage}), this model {dst.view_backbones!r} (split_stage "
                         f"{dst.split_stage}): start a view-specific model from a shared or identical stage 1")
    model.backbone.load_state_dict(state, strict=True)
    if dst.view_backbones != "shared":
        model.view_classifier.load_state_dict(stage1.model.view_classifier.state_dict(), strict=True)


def label_embeddings_for(variant: VariantConfig, label_names) -> tuple[torch.Tensor | None, dict | None]:
    """Frozen text embeddings of every label (zero-shot ones included) for a text-query variant."""
    if dict(variant.model_args).get("query") != "text":
        if variant.text_encoder:
            raise ValueError(f"variant {variant.name!r} sets text_encoder but not model_args.query: text")
        return None, None
    from dataclasses import asdict

    from cxrlt.models.text import TextEncoderSpec, embedding_id, encode_labels

    spec = TextEncoderSpec(**dict(variant.text_encoder))
    record = {**asdict(spec), "embedding_id": embedding_id(label_names, spec)}
    return encode_labels(label_names, spec), record


def build_model(variant: VariantConfig, label_space, device, models_dir: Path):
    """(model on `device`, stage-1 folder or None, text-encoder record or None).

    A stage-2 variant (`init_from`) takes its stage-1 artefact's backbone, looked up in `models_dir`,
    and keeps it frozen unless `freeze_backbone` is off.
    """
    emb, text_record = label_embeddings_for(variant, label_space.names)
    extra = {"label_embeddings": emb} if emb is not None else {}
    model = create_model(variant.model, num_labels=len(label_space), **dict(variant.model_args), **extra).to(device)
    init_dir = None
    if variant.init_from:
        init_dir = resolve_init(variant.init_from, models_dir)
        init_backbone(model, init_dir)
        if variant.freeze_backbone:
            model.backbone.requires_grad_(False)
    return model, init_dir, text_record
