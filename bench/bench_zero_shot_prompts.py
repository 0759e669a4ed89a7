"""Zero-shot AUROC of held-out findings under different prompt forms, for one text-query artefact.

The same images, the same model; only the text the held-out findings are embedded from changes:
  template      "a chest x-ray showing {name}": how `cxrlt predict --finding` scored new findings before
  trained form  the form the head was trained on (`finding_prompts`: "Name: description" for a
                description-trained head), as scoring does now
  ensemble      the trained form averaged with several phrasings (ENSEMBLE_TEMPLATES)
and, as the reference, the embeddings stored in the model (what evaluation scores).

    python bench/bench_zero_shot_prompts.py models/matrix/single-asl-text --manifest prepared/matrix/cache \
        [--split dev]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrlt.artefact.checkpoint import load_artefact
from cxrlt.data.manifest_io import load_manifest
from cxrlt.engine import make_dataset, per_image
from cxrlt.labels import LabelSpace
from cxrlt.evaluation.metrics import compute_metrics
from cxrlt.models.text import TextEncoderSpec, encode_findings


@torch.inference_mode()
def _probs(model, ds, emb) -> np.ndarray:
    out = []
    for b in DataLoader(ds, batch_size=64):
        out.append(torch.sigmoid(model(b["images"], b["view_mask"], b["view_types"], label_embeddings=emb)))
    return torch.cat(out).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artefact", help="an evaluated text-query artefact whose label space holds out findings")
    ap.add_argument("--manifest", required=True, help="the manifest it was evaluated on")
    ap.add_argument("--split", default="dev", help="a split with truth for the held-out findings (default: dev)")
    a = ap.parse_args(argv)
    art = load_artefact(a.artefact)
    rec = art.meta.get("text_encoder")
    ls = art.label_space
    if not rec or not ls.zero_shot:
        raise SystemExit(f"{a.artefact} needs a text-query head and held-out (zero-shot) findings")
    spec = TextEncoderSpec(**{k: v for k, v in rec.items() if k != "embedding_id"})
    man = load_manifest(a.manifest)
    frame = man.split(a.split)
    ds = make_dataset(man, a.split, art.model, int(art.meta["data"]["image_size"]), train=False)
    names = list(ls.zero_shot)
    stored = art.model.head.label_embeddings[[ls.index(n) for n in names]]
    forms = {"template (before)": encode_findings(names, replace(spec, prompt="template")),
             "trained form (now)": encode_findings(names, spec),
             "ensemble": encode_findings(names, spec, ensemble=True),
             "stored embeddings (evaluation)": stored}
    zs_space = LabelSpace(tuple(names), (0,) * len(names), ls.n_train)
    targets = frame[names].to_numpy()
    print(f"{a.artefact}: encoder {spec.name}, prompt {spec.prompt}; {len(frame)} {a.split} images; "
          f"positives {dict(zip(names, (targets == 1).sum(0).tolist()))}")
    sims = torch.nn.functional.cosine_similarity
    cols = [ls.index(n) for n in names]
    for form, emb in forms.items():
        full = np.zeros((len(ds), len(ls)))            # per_image copies whole label-space rows
        full[:, cols] = _probs(art.model, ds, emb)
        img = per_image(ds, full, frame)
        m = compute_metrics(img[names].to_numpy(), targets, zs_space)
        per = " ".join(f"{n} {v:.3f}" for n, v in zip(names, m["per_label"]["auroc"]))
        cos = float(sims(emb, stored).mean())
        print(f"  {form:32s} zero-shot mAUC {m['mAUC']:.3f}  mAP {m['mAP']:.3f}  (cos to stored {cos:.3f})  {per}")


if __name__ == "__main__":
    main()
