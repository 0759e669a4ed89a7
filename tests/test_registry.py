"""The registry with memory: serving history, rollback, stages and model cards live in the BentoML model
store itself, so `bentoml models export` / `import` carry them.

Tests run on the session's temporary model store (conftest), each under its own model name so that they
never see each other's models; a store of their own (export/import, migration) runs in a child process,
since BentoML reads BENTOML_HOME once, at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from cxrlt.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MANIFEST_MD5 = "feedc0ffee0123456789abcdef012345"


@pytest.fixture(scope="module")
def evaluated(tiny_artefact, tmp_path_factory) -> Path:
    """The session's tiny artefact, evaluated as `cxrlt evaluate` leaves one: metrics.json with bootstrap
    intervals per group, thresholds tuned on val, a data version and a code commit."""
    from cxrlt.artefact.checkpoint import write_evaluation

    art = tmp_path_factory.mktemp("registry") / "tiny-evaluated"
    shutil.copytree(tiny_artefact, art)
    meta = json.loads((art / "artefact.json").read_text())
    meta.update(data_version={"manifest_md5": MANIFEST_MD5, "dvc_md5": "abc.dir"}, git_commit=COMMIT)
    (art / "artefact.json").write_text(json.dumps(meta))
    split = {"mAP": 0.412, "mAUC": 0.7, "mF1": 0.3, "mAP_head": 0.61, "mAP_medium": 0.33, "mAP_tail": 0.052,
             "ece": 0.081, "n_images": 120, "mAP_ci95_low": 0.35, "mAP_ci95_high": 0.47,
             "mAP_tail_ci95_low": 0.011, "mAP_tail_ci95_high": 0.093}
    write_evaluation(art, {"val": split, "test": {**split, "mAP": 0.398}}, meta["thresholds"], "val")
    return art


@pytest.fixture
def name() -> str:
    return f"reg-{uuid.uuid4().hex[:10]}"


def register_n(art: Path, name: str, n: int) -> list[str]:
    from cxrlt.registry import store

    return [store.register(art, name=name) for _ in range(n)]


def in_store(home: Path, code: str) -> dict:
    """Run `code` in a child process on the model store at `home`; it prints one JSON object."""
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ history and rollback

def test_rollback_walks_back_one_model_at_a_time(evaluated, name):
    from cxrlt.registry import store

    a, b, c = register_n(evaluated, name, 3)
    for tag in (a, b, c):
        store.set_serving(tag, reason="test", action="promote")
    assert store.rollback(name=name) == b
    assert store.serving_tag(name=name) == b
    assert store.rollback(name=name) == a
    with pytest.raises(store.RegistryError, match="nothing earlier"):
        store.rollback(name=name)
    hist = store.history(name)
    assert [h["tag"] for h in hist] == [a, b, c, b, a]
    assert [h["action"] for h in hist] == ["promote", "promote", "promote", "rollback", "rollback"]
    assert [h["previous"] for h in hist] == [None, a, b, c, b]
    assert hist[3]["reason"] == f"rollback from {c}"
    assert store.last_event(name) == hist[-1]
    assert hist == sorted(hist, key=lambda h: h["time"])  # oldest first


def test_rollback_to_any_earlier_model(evaluated, name):
    from cxrlt.registry import store

    a, b, c, never = register_n(evaluated, name, 4)
    for tag in (a, b, c):
        store.set_serving(tag)
    assert store.rollback(to=a) == a and store.serving_tag(name=name) == a
    with pytest.raises(store.RegistryError, match="nothing earlier"):  # C and B came after A
        store.rollback(name=name)
    assert store.rollback(to=c) == c                                  # forward again, by name
    with pytest.raises(store.RegistryError, match="never served"):
        store.rollback(to=never)
    with pytest.raises(store.RegistryError, match="already"):
        store.rollback(to=c)
    with pytest.raises(store.RegistryError, match="no registered model"):
        store.rollback(to=f"{name}:doesnotexist")


def test_promote_best_records_why_and_what_it_replaced(evaluated, name, tmp_path):
    from cxrlt.registry import store

    assert store.last_event(name) is None and store.history(name) == []
    (a,) = register_n(evaluated, name, 1)
    better = tmp_path / "better"
    shutil.copytree(evaluated, better)
    metrics = json.loads((better / "metrics.json").read_text())
    metrics["val"]["mAP"] = 0.9
    (better / "metrics.json").write_text(json.dumps(metrics))
    (b,) = register_n(better, name, 1)
    store.set_serving(a)
    assert store.promote_best(name, data_version=MANIFEST_MD5) == b
    ev = store.last_event(name)
    assert ev["tag"] == b and ev["previous"] == a and ev["action"] == "promote"
    assert "validation mAP" in ev["reason"]
    assert store.promote_best(name, data_version=MANIFEST_MD5) == b
    assert len(store.history(name)) == 2  # promoting the served model again records nothing


def test_concurrent_promotions_lose_no_entry(evaluated, name):
    """Two processes moving the mark at once: every move is in the history, each naming what it replaced."""
    a, b = register_n(evaluated, name, 2)
    code = ("import sys; from cxrlt.registry import store\n"
            f"for i in range(8): store.set_serving(({a!r}, {b!r})[i % 2], reason='writer ' + sys.argv[1])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], env=env, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    from cxrlt.registry import store

    hist = store.history(name)
    assert sorted(h["reason"] for h in hist) == ["writer 0"] * 8 + ["writer 1"] * 8
    for before, after in zip(hist, hist[1:]):  # every entry names the model it really replaced
        assert after["previous"] == before["tag"]


# -------------------------------------------------------------------------------------------- stages

def test_stages_and_one_production_per_name(evaluated, name):
    from cxrlt.registry import store

    a, b, c = register_n(evaluated, name, 3)
    assert {store.stage_of(t) for t in (a, b, c)} == {"candidate"}
    store.set_serving(a)
    assert store.stage_of(a) == "production"
    store.set_stage(b, "production")  # by hand: B is served, A is archived
    assert (store.stage_of(a), store.stage_of(b), store.stage_of(c)) == ("archived", "production",
                                                                                  "candidate")
    assert store.serving_tag(name=name) == b and store.last_event(name)["action"] == "manual"
    store.set_stage(c, "archived")
    store.set_stage(a, "candidate")
    rows = {r["tag"]: r for r in store.list_registered(name)}
    assert {t: r["stage"] for t, r in rows.items()} == {a: "candidate", b: "production", c: "archived"}
    assert [r["stage"] for r in rows.values()].count("production") == 1
    with pytest.raises(store.RegistryError, match="production"):
        store.set_stage(b, "archived")  # the served model leaves production only by another's promotion
    with pytest.raises(store.RegistryError, match="unknown stage 'staging'.*candidate, production, archived"):
        store.set_stage(c, "staging")
    store.rollback(name=name)
    assert (store.stage_of(a), store.stage_of(b)) == ("production", "archived")


def test_describe_is_json_and_complete(evaluated, name):
    from cxrlt.registry import store

    (tag,) = register_n(evaluated, name, 1)
    store.set_serving(tag)
    d = store.describe(tag)
    json.dumps(d)
    assert d["tag"] == tag and d["stage"] == "production" and d["serving"] is True
    assert d["variant"] == "tiny" and d["loss"] == "asl" and d["synthetic"] is True
    assert d["data_version"]["manifest_md5"] == MANIFEST_MD5 and d["git_commit"] == COMMIT
    assert d["metrics"]["val"]["mAP_tail_ci95_high"] == pytest.approx(0.093)


# ----------------------------------------------------------------------------------------- model card

def test_model_card_is_stored_with_the_model_and_says_what_matters(evaluated, name):
    from cxrlt.registry import store

    (tag,) = register_n(evaluated, name, 1)
    card = store.model_card(tag)
    assert (store.model_path(tag) / "MODEL_CARD.md").read_text() == card
    assert tag in card and MANIFEST_MD5 in card and COMMIT in card
    assert "WARNING: SYNTHETIC DATA" in card.splitlines()[2]  # loud: right under the title
    assert "0.412 [0.350, 0.470]" in card               # val mAP with its bootstrap interval
    assert "0.052 [0.011, 0.093]" in card               # tail mAP with its interval
    assert any(row.startswith("| Hernia ") and "| 0.200 |" in row for row in card.splitlines())  # its threshold
    assert "ECE" in card and "0.081" in card
    for section in ("Intended use", "Limitations", "Decision thresholds", "Calibration", "Training parameters"):
        assert f"## {section}" in card


def test_model_card_of_real_data_is_not_flagged(evaluated):
    from cxrlt.artefact.meta import read_meta
    from cxrlt.registry.model_card import render_model_card

    meta = read_meta(evaluated)
    assert "WARNING: SYNTHETIC DATA" in render_model_card(meta, "m:1")
    meta["synthetic"] = False
    meta["label_space"]["synthetic"] = False
    real = render_model_card(meta, "m:1")
    assert "WARNING" not in real and "synthetic: no" in real
    del meta["metrics"]["val"]["mAP_ci95_low"], meta["metrics"]["val"]["mAP_ci95_high"]
    card = render_model_card(meta, "m:1")
    assert "0.412 [" not in card and "| 0.412 |" in card and "0.398 [0.350, 0.470]" in card


# ------------------------------------------------------------------------- the store carries it all

def test_history_travels_with_exported_models(evaluated, name, tmp_path):
    import bentoml

    from cxrlt.registry import store

    a, b, c = register_n(evaluated, name, 3)
    for tag in (a, b, c):
        store.set_serving(tag)
    store.set_stage(a, "archived")
    exported = [bentoml.models.export_model(t, str(tmp_path / f"{t.replace(':', '-')}.bentomodel"))
                for t in (c, b)]  # the served model and one earlier one; A stays behind
    out = in_store(tmp_path / "other-home", f"""
        import json, bentoml
        from cxrlt.registry import store
        for p in {exported!r}:
            bentoml.models.import_model(p)
        before = dict(serving=store.serving_tag(), history=store.history({name!r}),
                      stages=[store.stage_of(t) for t in ({c!r}, {b!r})], card=store.model_card({c!r}))
        try:
            store.rollback(to={a!r})
        except store.RegistryError as e:
            before["missing"] = str(e)
        before["rolled_back"] = store.rollback(name={name!r})
        print(json.dumps(before))
    """)
    assert out["serving"] == c
    assert out["history"] == store.history(name)
    assert out["stages"] == ["production", "archived"]
    assert out["card"] == store.model_card(c)
    assert a in out["missing"] and "import" in out["missing"]  # A was served once but is not in that store
    assert out["rolled_back"] == b


def test_old_serving_file_is_migrated_once(evaluated, tmp_path):
    name = "cxrlt"
    home = tmp_path / "home"
    out = in_store(home, f"""
        import json
        from cxrlt.registry import store
        a, b = store.register({str(evaluated)!r}), store.register({str(evaluated)!r})
        print(json.dumps([a, b]))
    """)
    a, b = out
    (home / "cxrlt-serving.json").write_text(json.dumps({"history": [
        {"tag": a, "time": "2025-01-02T10:00:00+0000", "reason": "best validation mAP among cxrlt models"},
        {"tag": b, "time": "2025-01-03T10:00:00+0000", "reason": "manual"}]}))
    out = in_store(home, f"""
        import json
        from cxrlt.registry import store
        print(json.dumps(dict(serving=store.serving_tag(), history=store.history({name!r}),
                              stage=store.stage_of({a!r}))))
    """)
    assert out["serving"] == b and out["stage"] == "archived"
    assert [(h["tag"], h["action"], h["previous"]) for h in out["history"]] == [(a, "promote", None),
                                                                               (b, "manual", a)]
    assert out["history"][0]["time"].startswith("2025-01-02T10:00:00")
    assert not (home / "cxrlt-serving.json").exists()  # read once: the store holds it now
    out = in_store(home, """
        import json
        from cxrlt.registry import store
        print(json.dumps(dict(rolled_back=store.rollback(), n=len(store.history()))))
    """)
    assert out == {"rolled_back": a, "n": 3}


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_show_stage_rollback_history(evaluated, name, capsys):
    from cxrlt.registry import store

    a, b = register_n(evaluated, name, 2)
    assert main(["registry", "promote", a]) == 0
    assert main(["registry", "promote", b]) == 0
    capsys.readouterr()
    assert main(["registry", "show", b]) == 0
    out = capsys.readouterr().out
    assert "stage: production" in out and MANIFEST_MD5 in out and f"{a} -> {b}" in out
    assert main(["registry", "history", "--name", name]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and b in lines[-1] and "manual" in lines[-1]  # a header and two entries
    assert main(["registry", "rollback", "--name", name]) == 0
    assert capsys.readouterr().out.strip() == f"serving {a} (was {b})"
    assert main(["registry", "stage", b, "candidate"]) == 0
    assert store.stage_of(b) == "candidate"
    assert main(["registry", "list", "--name", name]) == 0
    listed = capsys.readouterr().out
    assert "production" in listed and "candidate" in listed
    assert main(["registry", "rollback", "--to", b]) == 0
    assert capsys.readouterr().out.strip() == f"serving {b} (was {a})"
    assert main(["registry", "show", b, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stage"] == "production" and shown["tag"] == b and shown["history"][-1]["tag"] == b
    assert shown["card"] == store.model_card(b)


def test_cli_errors_are_one_clear_line(evaluated, name, capsys):
    (a,) = register_n(evaluated, name, 1)
    assert main(["registry", "rollback", "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrlt registry: error:") and "nothing" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["registry", "stage", a, "staging"]) == 2
    assert "unknown stage 'staging'" in capsys.readouterr().err
    assert main(["registry", "show", f"{name}:nope"]) == 2
    assert "cxrlt registry list" in capsys.readouterr().err
    for argv in (["registry", "--help"], ["registry", "show", "--help"], ["registry", "rollback", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--to" in capsys.readouterr().out
