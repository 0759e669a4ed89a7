"""Label-text embeddings: prompts, the tiny and MiniLM encoders, pooling, the disk cache, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from cxrlt.labels import LABELS_2023, TASK1_LABELS, TASK2_LABELS, TASK3_LABELS
from cxrlt.models import text
from cxrlt.models.prompts import load_descriptions
from cxrlt.models.text import (EncoderUnavailableError, TextEncoderSpec, available_encoders, embedding_id,
                               encode_labels, prompts_for)

ALL45 = list(TASK1_LABELS) + list(TASK3_LABELS)
TINY = TextEncoderSpec("tiny")


def _no_loading(spec):
    raise AssertionError(f"the encoder was loaded for {spec}")


def _save_tiny(folder):
    tok, model = text._build_tiny()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- descriptions and prompts

def test_descriptions_cover_every_label_and_are_one_short_line():
    d = load_descriptions()
    wanted = set(ALL45) | {"No Finding"} | set(LABELS_2023) | set(TASK2_LABELS)
    assert not wanted - set(d), f"labels without a description: {sorted(wanted - set(d))}"
    assert not set(d) - wanted, f"descriptions for unknown labels (typo?): {sorted(set(d) - wanted)}"
    for name, desc in d.items():
        assert "\n" not in desc and 8 <= len(desc.split()) <= 30, (name, desc)


def test_prompts_by_kind():
    names = ["Bulla", "Scoliosis"]
    assert prompts_for(names, TextEncoderSpec(prompt="name")) == names
    assert prompts_for(names, TextEncoderSpec(prompt="template", template="film with {name}")) == [
        "film with Bulla", "film with Scoliosis"]
    p = prompts_for(names, TextEncoderSpec(prompt="description"))
    assert p[0].startswith("Bulla: ") and "air-filled" in p[0]
    over = prompts_for(["Bulla"], TextEncoderSpec(), descriptions={"Bulla": "an air  space"})
    assert over == ["Bulla: an air space"]


def test_missing_description_is_an_error_unless_allowed():
    with pytest.raises(KeyError, match="Pneumatocele"):
        prompts_for(["Bulla", "Pneumatocele"], TextEncoderSpec())
    with pytest.warns(UserWarning, match="Pneumatocele"):
        p = prompts_for(["Bulla", "Pneumatocele"], TextEncoderSpec(), allow_missing=True)
    assert p[1] == "a chest x-ray showing Pneumatocele" and p[0].startswith("Bulla: ")


def test_label_names_must_be_a_list():
    with pytest.raises(TypeError, match="list of names"):
        prompts_for("Bulla", TINY)
    with pytest.raises(ValueError, match="non-empty"):
        encode_labels([], TINY, use_cache=False)


# ---------------------------------------------------------------- tiny encoder, pooling

def test_tiny_encoder_is_offline_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = encode_labels(ALL45, TINY, use_cache=False)
    after = torch.rand(3)
    b = encode_labels(ALL45, TINY, use_cache=False)
    assert torch.equal(before, after)
    assert a.shape == (45, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(45), atol=1e-5)
    assert (a @ a.T - torch.eye(45)).abs().max() < 0.9999  # distinct labels get distinct vectors


def test_tiny_vocabulary_knows_every_word_of_the_packaged_prompts():
    # transformers 5 ignores BertTokenizer(vocab_file=...): a wrong argument would make every word [UNK]
    tok, _ = text._build_tiny()
    names = ALL45 + ["No Finding"]
    for spec in (TextEncoderSpec("tiny", prompt=k) for k in ("name", "template", "description")):
        ids = tok(prompts_for(names, spec))["input_ids"]
        assert all(tok.unk_token_id not in row for row in ids), spec.prompt


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_an_embedding(pooling):
    spec = TextEncoderSpec("tiny", pooling=pooling, prompt="template")
    short, long = prompts_for(["Bulla", "Calcification of the Aorta"], spec)
    tok, _ = text._build_tiny()
    assert len(tok(short)["input_ids"]) < len(tok(long)["input_ids"])  # so "Bulla" really gets padding
    alone = encode_labels(["Bulla"], spec, use_cache=False)
    batched = encode_labels(["Bulla", "Calcification of the Aorta"], spec, use_cache=False)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_mean_pooling_uses_the_attention_mask():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = text._pool(hidden, mask, "mean")
    assert torch.allclose(pooled[0], hidden[0, :2].mean(0))
    hidden[0, 2:] = 1e3  # padding positions hold anything; the result must not move
    assert torch.allclose(text._pool(hidden, mask, "mean")[0], pooled[0])
    assert torch.equal(text._pool(hidden, mask, "cls"), hidden[:, 0])


def test_embeddings_work_as_text_queries():
    from cxrlt.models.heads import QueryHead

    emb = encode_labels(list(TASK3_LABELS), TINY, use_cache=False)
    head = QueryHead(d_model=16, num_labels=5, heads=2, ff_dim=32, dropout=0.0, query="text", label_embeddings=emb)
    out = head(torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool))
    assert out.shape == (2, 5)


# ---------------------------------------------------------------- cache

def test_cache_hit_never_loads_the_encoder_and_any_change_misses(tmp_path, monkeypatch):
    names = ["Bulla", "Emphysema", "Scoliosis"]
    spec = TextEncoderSpec("tiny", prompt="template")
    first = encode_labels(names, spec, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(text, "_load_encoder", _no_loading)
    assert torch.equal(encode_labels(names, spec, cache_dir=tmp_path), first)
    changed = [TextEncoderSpec("tiny", prompt="template", pooling="cls"), TextEncoderSpec("tiny", prompt="name"),
               TextEncoderSpec("tiny", prompt="template", template="radiograph with {name}"),
               TextEncoderSpec("tiny", prompt="template", max_length=16)]
    for other in changed:
        with pytest.raises(AssertionError, match="the encoder was loaded"):
            encode_labels(names, other, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="the encoder was loaded"):  # row order is part of the key
        encode_labels(names[::-1], spec, cache_dir=tmp_path)


def test_changed_description_text_misses_the_cache():
    spec = TextEncoderSpec("tiny")
    assert embedding_id(["Bulla"], spec) == embedding_id(["Bulla"], spec)
    assert embedding_id(["Bulla"], spec) != embedding_id(["Bulla"], spec, descriptions={"Bulla": "an air space"})
    assert embedding_id(["Bulla"], spec) != embedding_id(["Bulla"], TextEncoderSpec("tiny", template="{name} seen"))


def test_unreadable_cache_file_is_recomputed(tmp_path):
    spec = TextEncoderSpec("tiny", prompt="name")
    path = tmp_path / f"{embedding_id(['Bulla'], spec)}.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="ignoring label-embedding cache file"):
        emb = encode_labels(["Bulla"], spec, cache_dir=tmp_path)
    assert emb.shape == (1, 32)
    assert torch.equal(encode_labels(["Bulla"], spec, cache_dir=tmp_path), emb)  # rewritten, now readable


# ---------------------------------------------------------------- local folders and the HF cache

def test_local_folder_encoder_matches_the_model_saved_there(tmp_path):
    folder = _save_tiny(tmp_path / "enc")
    spec = TextEncoderSpec(f"path:{folder}")
    assert torch.allclose(encode_labels(ALL45, spec, use_cache=False),
                          encode_labels(ALL45, TextEncoderSpec("tiny"), use_cache=False), atol=1e-6)
    before = embedding_id(["Bulla"], spec)
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert embedding_id(["Bulla"], spec) != before  # replaced weights/config in place -> new key


def test_hub_ids_load_from_the_local_hf_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = TextEncoderSpec("pubmedbert", prompt="name")
    with pytest.raises(EncoderUnavailableError, match="not in the local Hugging Face cache.*'minilm' works offline"):
        encode_labels(["Bulla"], spec, use_cache=False)
    assert "not cached" in available_encoders()["pubmedbert"]
    repo = tmp_path / "hub" / ("models--" + text.HUB_IDS["pubmedbert"].replace("/", "--"))
    commit = "0" * 40
    _save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert available_encoders()["pubmedbert"].endswith(": cached")
    assert encode_labels(["Bulla"], spec, use_cache=False).shape == (1, 32)


def test_cased_vocabulary_without_tokenizer_config_is_not_lower_cased(tmp_path):
    from transformers import BertConfig, BertModel

    vocab = list(text.SPECIAL_TOKENS) + ["Bulla", "bulla", "B", "##ulla"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path)
    tok, _ = text._load_encoder(TextEncoderSpec("umlsbert", folder=str(tmp_path)))
    assert tok.tokenize("Bulla") == ["Bulla"]


def test_model_code_in_the_folder_needs_trust_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "cxr-bert", "auto_map": {"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                                               "AutoModel": "modeling_cxrbert.CXRBertModel"}}))
    with pytest.raises(EncoderUnavailableError, match="trust_remote_code=True"):
        encode_labels(["Bulla"], TextEncoderSpec("cxr-bert", folder=str(tmp_path)), use_cache=False)


# ---------------------------------------------------------------- errors

def test_unknown_encoder_and_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown text encoder 'clip'.*minilm"):
        TextEncoderSpec("clip")
    with pytest.raises(ValueError, match="umlsbert is not on the model hub"):
        TextEncoderSpec("umlsbert")
    with pytest.raises(ValueError, match="needs a folder"):
        TextEncoderSpec("path:")
    with pytest.raises(ValueError, match="unknown pooling"):
        TextEncoderSpec(pooling="max")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        TextEncoderSpec(prompt="report")
    for bad in ("a chest x-ray", "{name} in the {lobe}"):
        with pytest.raises(ValueError, match="must contain the field"):
            TextEncoderSpec(template=bad)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_labels(["Bulla"], TextEncoderSpec(f"path:{tmp_path / 'nope'}"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        encode_labels(["Bulla"], TextEncoderSpec("umlsbert", folder=str(tmp_path)), cache_dir=tmp_path)


def test_available_encoders_lists_every_kind():
    assert set(available_encoders()) == set(text.ENCODERS) | {"path:<folder>"}
    assert "installed" in available_encoders()["minilm"]


# ---------------------------------------------------------------- MiniLM (the offline default)

@pytest.fixture(scope="module")
def minilm_descriptions(tmp_path_factory):
    cache = tmp_path_factory.mktemp("label-emb")
    return encode_labels(ALL45, TextEncoderSpec("minilm", prompt="description"), cache_dir=cache)


def test_minilm_embeddings_shape_and_norm(minilm_descriptions):
    assert minilm_descriptions.shape == (45, 384) and minilm_descriptions.dtype == torch.float32
    assert torch.allclose(minilm_descriptions.norm(dim=1), torch.ones(45), atol=1e-5)


@pytest.mark.parametrize("label, neighbour", [("Bulla", "Emphysema"), ("Scoliosis", "Kyphosis"),
                                              ("Cardiomyopathy", "Cardiomegaly")])
def test_minilm_descriptions_put_zero_shot_labels_next_to_their_relatives(minilm_descriptions, label, neighbour):
    sim = minilm_descriptions @ minilm_descriptions.T
    i = ALL45.index(label)
    sim[i, i] = -2.0
    assert ALL45[int(sim[i].argmax())] == neighbour
