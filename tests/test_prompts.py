"""Zero-shot scoring uses the prompt form the text head was trained on; a study is scored as `predict` does."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlt.artefact.checkpoint import save_artefact
from cxrlt.inference import Predictor, StudyInputError
from cxrlt.labels import LabelSpace
from cxrlt.models import create_model
from cxrlt.models.prompts import ENSEMBLE_TEMPLATES, build_prompts, finding_prompts, load_descriptions, parse_finding
from cxrlt.models.text import TextEncoderSpec, embedding_id, encode_findings, encode_labels

NAMES = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Bulla")
SPEC = TextEncoderSpec(name="tiny", prompt="description")


def test_parse_finding():
    assert parse_finding("Bulla") == ("Bulla", None)
    assert parse_finding("  Bulla :  thin-walled   air space ") == ("Bulla", "thin-walled air space")
    assert parse_finding("Bulla:") == ("Bulla", None)
    for bad in ("", "   ", ": only a description"):
        with pytest.raises(ValueError):
            parse_finding(bad)


def test_finding_prompts_take_the_trained_form():
    desc = load_descriptions()
    # description-trained: a packaged label gets exactly its training prompt; a given description is used;
    # a new finding without one falls back to the recorded template, as undescribed labels did in training
    got = finding_prompts(["Cardiomegaly", "Pneumatocele: a thin-walled gas cyst", "Pneumatocele"],
                          "description", "film with {name}")
    assert got[0] == build_prompts(["Cardiomegaly"], "description") == [f"Cardiomegaly: {desc['Cardiomegaly']}"]
    assert got[1] == ["Pneumatocele: a thin-walled gas cyst"] and got[2] == ["film with Pneumatocele"]
    # template- and name-trained heads never saw descriptions: the name in their form
    assert finding_prompts(["Bulla: anything"], "template", "film with {name}") == [["film with Bulla"]]
    assert finding_prompts(["Bulla"], "name") == [["Bulla"]]
    ens = finding_prompts(["Bulla"], "description", ensemble=True)[0]
    assert ens[0] == f"Bulla: {desc['Bulla']}" and ens[1:] == [t.format(name="Bulla") for t in ENSEMBLE_TEMPLATES]


@pytest.fixture(scope="module")
def text_artefacts(tmp_path_factory):
    """A single-view and a fusion text-query model (random weights) saved as artefacts, as training saves them."""
    root = tmp_path_factory.mktemp("prompts")
    ls = LabelSpace.from_counts({n: 10 for n in NAMES[:3]} | {"Bulla": 0}, 100, zero_shot=("Bulla",))
    emb = encode_labels(list(NAMES), SPEC, cache_dir=root / "cache")
    record = {**asdict(SPEC), "embedding_id": embedding_id(list(NAMES), SPEC)}
    out = {}
    for model_name in ("single_test", "chexfusion_test"):
        torch.manual_seed(0)
        m = create_model(model_name, num_labels=len(NAMES), query="text", label_embeddings=emb)
        out[model_name] = save_artefact(root / model_name, m, model_name=model_name, label_space=ls,
                                        text_encoder=record, data={"image_size": 32})
    return out


def _study(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)) for _ in range(2)]


@pytest.mark.parametrize("model_name", ["single_test", "chexfusion_test"])
def test_known_labels_score_exactly_as_predicted(text_artefacts, model_name):
    """A label of the model named at scoring time gets the very probability `predict` gives it, with the
    study's views (a single-view model averages its images, each with its own view)."""
    p = Predictor.from_path(text_artefacts[model_name])
    imgs, views = _study(), ["frontal", "lateral"]
    full = p.predict([imgs], [views])[0]
    got = p.score_findings(imgs, ["Cardiomegaly", "Bulla", "Pneumothorax"], views)
    for name, prob in got.items():
        assert prob == pytest.approx(full[NAMES.index(name)], abs=2e-6), name
    if model_name == "single_test":
        per_image = [p.predict([[im]], [[v]])[0][NAMES.index("Bulla")] for im, v in zip(imgs, views)]
        assert got["Bulla"] == pytest.approx(np.mean(per_image), abs=2e-6)


def test_the_scoring_prompt_is_the_training_prompt(text_artefacts):
    """A finding written out with its packaged description is encoded from the same text as in training:
    its fresh embedding equals the stored row, so it scores like the label. The generic template, which the
    head never saw, gives another embedding and another score."""
    p = Predictor.from_path(text_artefacts["chexfusion_test"])
    stored = p.artefact.model.head.label_embeddings[NAMES.index("Bulla")]
    written = f"Bulla: {load_descriptions()['Bulla']}"
    assert torch.allclose(encode_findings([written], SPEC)[0], stored, atol=1e-6)
    imgs = _study(1)
    assert p.score_findings(imgs, [written])[written] == pytest.approx(p.score_findings(imgs, ["Bulla"])["Bulla"],
                                                                       abs=2e-6)
    template = encode_findings(["Bulla"], TextEncoderSpec(name="tiny", prompt="template"))[0]
    assert not torch.allclose(template, stored, atol=1e-3)


def test_a_finding_scores_the_same_whatever_else_is_asked(text_artefacts):
    p = Predictor.from_path(text_artefacts["chexfusion_test"])
    imgs = _study(2)
    both = p.score_findings(imgs, ["Pneumatocele: a thin-walled gas cyst", "Bulla"])
    alone = p.score_findings(imgs, ["Pneumatocele: a thin-walled gas cyst"])
    assert alone["Pneumatocele: a thin-walled gas cyst"] == pytest.approx(
        both["Pneumatocele: a thin-walled gas cyst"], abs=2e-6)


def test_ensemble_is_the_normalised_mean_of_phrasings():
    groups = finding_prompts(["Pneumatocele"], "description", ensemble=True)[0]
    rows = encode_findings(groups, TextEncoderSpec(name="tiny", prompt="name"))   # each text as it stands
    want = torch.nn.functional.normalize(rows.mean(0), dim=-1)
    got = encode_findings(["Pneumatocele"], SPEC, ensemble=True)[0]
    assert torch.allclose(got, want, atol=1e-6) and got.norm() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(got, encode_findings(["Pneumatocele"], SPEC)[0], atol=1e-3)


def test_clear_errors(text_artefacts):
    p = Predictor.from_path(text_artefacts["chexfusion_test"])
    with pytest.raises(StudyInputError, match="no name"):
        p.score_findings(_study(), [": just a description"])
