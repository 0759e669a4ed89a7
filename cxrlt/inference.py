"""Prediction on uploaded studies, shared by the CLI and the service.

A study is 1..max_views images (PIL) with an optional view per image ("frontal", "lateral", or
None/"unknown"). Studies are padded to fixed slots with a view mask, so a study's probabilities never
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from cxrlt.artefact.checkpoint import Artefact, load_artefact
from cxrlt.data.dataset import choose_views, pad_study
from cxrlt.data.transforms import image_to_tensor
from cxrlt.labels import is_normal
from cxrlt.views import VIEW_CODES

FINDINGS = "findings"  # in `explain`: the labels at or over their threshold
MAX_EXPLAIN = 5        # findings per `explain` call (each costs one forward and backward pass)


class StudyInputError(ValueError):
    """An uploaded study that cannot be scored; the message says what to fix."""


def check_explain(findings: Sequence[str], label_names: Sequence[str]) -> tuple[list[str], bool]:
    """What to explain, checked before any image is read: -> (the named labels, in order, without
    duplicates; whether FINDINGS was asked for). Raises StudyInputError naming the valid labels."""
    wanted = [str(f).strip() for f in findings if str(f).strip()]
    if not wanted:
        raise StudyInputError(f"name 1 to {MAX_EXPLAIN} findings to explain, or '{FINDINGS}'")
    unknown = [f for f in wanted if f != FINDINGS and f not in label_names]
    if unknown:
        raise StudyInputError(f"unknown finding(s) {unknown} to explain: this model's labels are "
                              f"{list(label_names)} (or '{FINDINGS}' for those over threshold)")
    explicit = list(dict.fromkeys(f for f in wanted if f != FINDINGS))
    if len(explicit) > MAX_EXPLAIN:
        raise StudyInputError(f"{len(explicit)} findings to explain: at most {MAX_EXPLAIN} per request")
    return explicit, FINDINGS in wanted


def view_code(view: str | None) -> int:
    if view is None or view == "":
        return VIEW_CODES["unknown"]
    v = str(view).strip().lower()
    if v not in VIEW_CODES:
        raise StudyInputError(f"unknown view {view!r}: use frontal, lateral or unknown")
    return VIEW_CODES[v]


@dataclass
class Predictor:
    artefact: Artefact
    tag: str
    device: torch.device

    @classmethod
    def from_path(cls, path: str | Path, tag: str | None = None, device: str = "cpu") -> "Predictor":
        dev = torch.device(device)
        return cls(load_artefact(path, dev), tag or Path(path).name, dev)

    @classmethod
    def from_registry(cls, tag: str | None = None, device: str = "cpu") -> "Predictor":
        from cxrlt.registry import store

        tag = tag or store.serving_tag()
        return cls.from_path(store.model_path(tag), tag=tag, device=device)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.artefact.label_space.names

    @property
    def thresholds(self) -> np.ndarray:
        return self.artefact.thresholds

    @property
    def image_size(self) -> int:
        return int(self.artefact.meta["data"]["image_size"])

    @property
    def max_views(self) -> int:
        return int(self.artefact.model.config.max_views)

    @property
    def synthetic(self) -> bool:
        return bool(self.artefact.meta.get("synthetic"))

    @property
    def ood_gate(self):
        """The artefact's OOD gate (`cxrlt.gate.OODGate`), or None when it carries none."""
        if not hasattr(self, "_ood_gate"):
            from cxrlt.gate import load_gate
            from cxrlt.gate.ood import GateError, feature_name

            gate = load_gate(self.artefact.path)
            for g in [gate, gate.fallback] if gate is not None else []:
                if g is None:
                    continue
                want = (feature_name(self.artefact.model, g.input), self.image_size)
                if (g.feature, g.image_size) != want:
                    raise GateError(f"the OOD gate of {self.tag} ({g.feature}, {g.image_size} px) does not fit the "
                                    f"model ({want[0]}, {want[1]} px); recalibrate it with `cxrlt gate`")
            self._ood_gate = gate
        return self._ood_gate

    @torch.inference_mode()
    def gate_images(self, images: Sequence[Image.Image], views: Sequence[str | None] | None = None) -> list:
        """The out-of-distribution check of each image (a `cxrlt.gate.GateCheck`, in order): its score, the
        stored threshold, passed or not. Each image is scored on its own (views route a view-specific
        backbone, as in `predict`), so a score never depends on the other images. A model without a gate
        gets checks that did not run, saying so. A refused image whose negative would pass is reported as
        inverted. Combine with the rules: `cxrlt.gate.check_image(info, image) + [check]`. This runs the
        backbone for the gate alone; `predict_gated` scores and gates from one pass."""
        from cxrlt.gate.ood import features

        codes = self._gate_codes(images, views)
        gate = self.ood_gate
        if gate is None or not images:
            return self._gate_checks(gate, images, codes, [])
        scores = gate.score(features(self.artefact.model, images, codes, self.image_size, gate.reference, self.device))
        return self._gate_checks(gate, images, codes, scores)

    @torch.inference_mode()
    def predict_gated(self, studies: Sequence[Sequence[Image.Image]],
                      views: Sequence[Sequence[str | None] | None] | None = None) -> tuple[np.ndarray, list[list]]:
        """`predict` and `gate_images` together: -> (probabilities [n_studies, L], the OOD checks of each study's
        images in upload order). The gate's features come from the prediction's own backbone pass
        (`forward_with_features`), so each image crosses the backbone once. Again only: an image over the
        gate's threshold (its histogram-matched copy decides: `cxrlt.gate.ood`), a refused one (is its negative
        in distribution?) and one the model does not score (a study over max_views). A gate fitted on
        histogram-matched images alone (earlier versions'; `cxrlt gate` refits it) gets a pass of its own."""
        from cxrlt.gate.ood import MODEL_INPUT, features

        views = list(views) if views is not None else [None] * len(studies)
        gate = self.ood_gate
        if gate is None or gate.input != MODEL_INPUT:
            probs = self._forward_studies(studies, views)
            flat = self.gate_images([im for s in studies for im in s],
                                    [v for s, vs in zip(studies, views) for v in (vs or [None] * len(s))])
            it = iter(flat)
            return probs, [[next(it) for _ in s] for s in studies]
        probs, pooled = self._forward_studies(studies, views, pool=True)
        # every image of the batch at once, so the few that need a second pass share it
        imgs = [im for s in studies for im in s]
        codes = [c for s, vs in zip(studies, views) for c in self._gate_codes(s, vs)]
        feats = [f for per in pooled for f in per]
        missing = [i for i, f in enumerate(feats) if f is None]  # not among the views the model scored
        if missing:
            extra = features(self.artefact.model, [imgs[i] for i in missing], [codes[i] for i in missing],
                             self.image_size, None, self.device)
            for i, f in zip(missing, extra):
                feats[i] = f
        it = iter(self._gate_checks(gate, imgs, codes, gate.score(np.stack(feats))))
        return probs, [[next(it) for _ in s] for s in studies]

    def _gate_codes(self, images, views) -> list[int]:
        views = list(views) if views is not None else [None] * len(images)
        if len(views) != len(images):
            raise StudyInputError(f"{len(images)} images but {len(views)} views: give one view per image or none")
        return [view_code(v) for v in views]

    def _gate_checks(self, gate, images, codes, scores) -> list:
        """The gate's scores of the images -> GateChecks. An image over the threshold of a gate with a fallback
        (histogram-matched images) is scored again by the fallback, whose verdict stands; a refused image's
        negative is scored to tell an inverted export. No gate -> checks that did not run."""
        from cxrlt.gate.messages import ood_refusal
        from cxrlt.gate.ood import features
        from cxrlt.gate.rules import GateCheck

        if gate is None:
            why = (f"model {self.tag} carries no OOD gate (eval/gate.json): the out-of-distribution check did not "
                   "run. Calibrate one with `cxrlt gate ARTEFACT --manifest DIR`")
            return [GateCheck("ood", False, None, None, why) for _ in images]
        model, size, final = self.artefact.model, self.image_size, gate.decider

        def score(idx, g, invert=False):
            return g.score(features(model, [images[i] for i in idx], [codes[i] for i in idx], size, g.reference,
                                    self.device, invert=invert))

        value = {i: (float(s), gate.threshold) for i, s in enumerate(scores)}
        refused = [i for i, s in enumerate(scores) if s > gate.threshold]
        if refused and gate.fallback is not None:  # re-exported with another window / gamma? the matched gate says
            value.update({i: (float(s), final.threshold) for i, s in zip(refused, score(refused, final))})
            refused = [i for i in refused if value[i][0] > final.threshold]
        negative = {}
        if refused:  # would the negative pass? then say so (a PNG / JPEG exported with the wrong polarity)
            negative = dict(zip(refused, score(refused, final, invert=True) <= final.threshold))
        out = []
        for i in range(len(images)):
            s, thr = round(value[i][0], 4), round(float(value[i][1]), 4)
            if i not in negative:
                out.append(GateCheck("ood", True, True, None, "", s, thr))
            elif negative[i]:
                msg = ("The image looks like a negative (inverted: bone dark, air bright). Send it with bone bright "
                       "(DICOM with its PhotometricInterpretation, or a PNG / JPEG as a viewer shows it).")
                out.append(GateCheck("ood", True, False, "inverted", msg, s, thr))
            else:
                msg = ood_refusal(s, thr, final.frr, self.synthetic)
                out.append(GateCheck("ood", True, False, "ood", msg, s, thr))
        return out

    def encode_study(self, images: Sequence[Image.Image], views: Sequence[str | None] | None = None,
                     with_order: bool = False):
        """-> (images [V,3,S,S], view_mask [V], view_types [V]) for one study; single-view models get
        the study's images as separate items (see predict). `with_order`: -> (that, the upload index of
        each filled slot)."""
        if not images:
            raise StudyInputError("a study needs at least one image")
        views = list(views) if views is not None else [None] * len(images)
        if len(views) != len(images):
            raise StudyInputError(f"{len(images)} images but {len(views)} views: give one view per image or none")
        codes = [view_code(v) for v in views]
        keep = choose_views(codes, [f"{i:04d}" for i in range(len(images))], self.max_views)
        encoded = pad_study([image_to_tensor(images[j], self.image_size) for j in keep], [codes[j] for j in keep],
                            self.max_views)
        return (encoded, list(keep)) if with_order else encoded

    @torch.inference_mode()
    def predict(self, studies: Sequence[Sequence[Image.Image]],
                views: Sequence[Sequence[str | None] | None] | None = None) -> np.ndarray:
        """Probabilities [n_studies, L]. A single-view model scores each image and averages its study."""
        return self._forward_studies(studies, views)

    def _forward_studies(self, studies, views=None, label_embeddings: torch.Tensor | None = None, pool: bool = False):
        """Probabilities [n_studies, L]; `pool`: -> (that, per study the pooled stage features of each image
        from the same pass, in upload order, None for an image the model did not score)."""
        views = list(views) if views is not None else [None] * len(studies)
        if self.max_views == 1:
            flat, owner = [], []
            for i, (imgs, vs) in enumerate(zip(studies, views)):
                vs = list(vs) if vs is not None else [None] * len(imgs)
                if not imgs:
                    raise StudyInputError("a study needs at least one image")
                for img, vw in zip(imgs, vs):
                    flat.append(self.encode_study([img], [vw]))
                    owner.append(i)
            probs, pooled = self._forward(flat, label_embeddings, pool)
            owner = np.asarray(owner)
            probs = np.stack([probs[owner == i].mean(0) for i in range(len(studies))])
            if not pool:
                return probs
            return probs, [[pooled[k, 0] for k in np.flatnonzero(owner == i)] for i in range(len(studies))]
        encoded = [self.encode_study(imgs, vs, with_order=True) for imgs, vs in zip(studies, views)]
        probs, pooled = self._forward([e for e, _ in encoded], label_embeddings, pool)
        if not pool:
            return probs
        feats = []
        for i, ((_, order), imgs) in enumerate(zip(encoded, studies)):
            per = [None] * len(imgs)
            for slot, j in enumerate(order):
                per[j] = pooled[i, slot]
            feats.append(per)
        return probs, feats

    def _forward(self, encoded: list, label_embeddings: torch.Tensor | None = None, pool: bool = False):
        """-> (probabilities [B, L], pooled stage features [B, V, F] of the same pass or None without `pool`)."""
        x = torch.stack([e[0] for e in encoded]).to(self.device)
        mask = torch.stack([e[1] for e in encoded]).to(self.device)
        types = torch.stack([e[2] for e in encoded]).to(self.device)
        model = self.artefact.model
        if pool and model.training:
            raise RuntimeError("the model is in training mode; call model.eval() first (BatchNorm statistics)")
        out = (model.forward_with_features if pool else model)(x, mask, types, label_embeddings=label_embeddings)
        logits, pooled = out if pool else (out, None)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return probs, None if pooled is None else pooled.float().cpu().numpy()

    @torch.inference_mode()
    def score_findings(self, images: Sequence[Image.Image], findings: Sequence[str],
                       views: Sequence[str | None] | None = None, ensemble: bool = False) -> dict[str, float]:
        """Zero-shot: score findings from their text, with the text encoder and the prompt form the model
        was trained with (`cxrlt.models.prompts.finding_prompts`). A finding is "Name" or "Name: description".
        A label of the model's own label space named without a description uses its stored embedding,
        exactly what training used. `ensemble` averages several phrasings of each new finding. The study
        is scored as `predict` scores it: its views go with its images, and a single-view model averages
        its images. Returns finding text -> probability (uncalibrated for findings never trained on)."""
        from cxrlt.models.prompts import parse_finding
        from cxrlt.models.text import TextEncoderSpec, encode_findings

        rec = self.artefact.meta.get("text_encoder")
        if not rec:
            raise StudyInputError("this model has learned per-label queries and cannot score new findings; "
                                  "use a variant with `model_args: {query: text}`")
        try:
            parsed = [parse_finding(f) for f in findings]
        except ValueError as e:
            raise StudyInputError(str(e)) from None
        if not parsed:
            raise StudyInputError("give at least one finding text to score")
        stored = self.artefact.model.head.label_embeddings
        own = {n: i for i, n in enumerate(self.label_names)}
        new = [f for f, (name, desc) in zip(findings, parsed) if desc or name not in own]
        fresh = {}
        if new:
            spec = TextEncoderSpec(**{k: v for k, v in rec.items() if k != "embedding_id"})
            fresh = dict(zip(new, encode_findings(new, spec, ensemble=ensemble).to(stored)))
        emb = torch.stack([fresh[f] if f in fresh else stored[own[name]] for f, (name, _) in zip(findings, parsed)])
        probs = self._forward_studies([images], [views], emb)[0]
        return {f: round(float(p), 6) for f, p in zip(findings, probs)}

    def explain(self, images: Sequence[Image.Image], views: Sequence[str | None] | None,
                findings: Sequence[str], probs: np.ndarray | None = None) -> list[dict]:
        """Heatmaps of where each finding's evidence lies in each image of one study (`cxrlt.explain`:
        Grad-CAM on the backbone's last feature map; the docstring there says why not attention).

        findings: label names of this model, or the word "findings" for the labels at or over their
        threshold (most probable first; `probs`, the study's probabilities, saves a forward pass); at most
        MAX_EXPLAIN in all. Returns one dict per finding and image, findings in order, images in upload
        order: {"finding", "image" (0-based upload index), "method": "gradcam", "map": float32 [S, S] in
        [0, 1] at the model's input size, "width", "height"}. The maps of one finding share one scale over
        the study. Computed for this study alone: other studies never change them."""
        from cxrlt.explain import gradcam, normalise

        names = self.explain_targets(images, views, findings, probs)
        if not names:  # "findings" and none over threshold
            return []
        views = list(views) if views is not None else [None] * len(images)
        index = {n: i for i, n in enumerate(self.label_names)}
        model, labels, out = self.artefact.model, [index[n] for n in names], []
        if self.max_views == 1:  # a single-image model scores each image on its own: one scale per finding
            raw = torch.stack([gradcam(model, *(t.to(self.device) for t in self.encode_study([img], [v])), labels,
                                       normalize=False)[:, 0] for img, v in zip(images, views)], 1)
            maps, order = torch.stack([normalise(m) for m in raw]), list(range(len(images)))
        else:
            encoded, order = self.encode_study(images, views, with_order=True)
            maps = gradcam(model, *(t.to(self.device) for t in encoded), labels)  # [K, V_real, S, S]
        for name, per_image in zip(names, maps):
            for slot, image in enumerate(order):
                m = per_image[slot].numpy().astype(np.float32)
                out.append({"finding": name, "image": image, "method": "gradcam", "map": m,
                            "width": int(m.shape[1]), "height": int(m.shape[0])})
        return out

    def explain_targets(self, images, views, findings: Sequence[str], probs: np.ndarray | None = None) -> list[str]:
        """The label names `explain` will map: names checked against the model's labels (an unknown one
        raises StudyInputError listing the valid ones), "findings" expanded, duplicates dropped, <= MAX_EXPLAIN."""
        explicit, over_threshold = check_explain(findings, self.label_names)
        if not over_threshold:
            return explicit
        if probs is None:
            probs = self.predict([images], [views])[0]
        over = [self.label_names[i] for i in np.argsort(-probs)  # Normal / No Finding has nothing to point at
                if probs[i] >= self.thresholds[i] and not is_normal(self.label_names[i])]
        return list(dict.fromkeys(explicit + over))[:MAX_EXPLAIN]

    @property
    def guarantee(self):
        """The finding sets' guarantee (`cxrlt.evaluation.guarantee.Guarantee`) or None for a model evaluated
        before guarantees existed; read once, not per prediction."""
        if not hasattr(self, "_guarantee"):
            from cxrlt.evaluation.guarantee import stored_guarantee

            self._guarantee = stored_guarantee(self.artefact.meta)
        return self._guarantee

    def describe(self, probs: np.ndarray) -> dict:
        """One study's probabilities -> the service's response body."""
        names, thr = self.label_names, self.thresholds
        order = np.argsort(-probs)
        g = self.guarantee
        guaranteed = g.answer(probs, names) if g is not None else {
            "available": False, "set": [], "confirmed": [], "uncertain": [],
            "statement": f"No guarantee: model {self.tag} was evaluated before guarantees existed; evaluate it again "
                         "with `cxrlt evaluate`"}
        return {"model_tag": self.tag, "synthetic_model": self.synthetic,
                "probabilities": {names[i]: round(float(probs[i]), 6) for i in range(len(names))},
                "thresholds": {names[i]: round(float(thr[i]), 6) for i in range(len(names))},
                "findings": [names[i] for i in order if probs[i] >= thr[i]],
                "guarantee": guaranteed}
