"""DVC's cache linked, not copied (`dvc config cache.type hardlink,symlink`, for full-size data): DVC makes the
workspace files hard links to its read-only cache objects. Whatever rewrites a file of a pipeline output
(`cxrlt gate` refitting eval/gate.*, a re-evaluation's metrics and thresholds, the guarantee) must replace it,
never write through the link into the cache."""

import json
import os

import pytest

from cxrlt.artefact.checkpoint import write_evaluation
from cxrlt.artefact.meta import replacing, write_text


def linked(tmp_path, name, text):
    """`name` in a workspace folder as DVC leaves it: a hard link to a read-only cache object."""
    cache, work = tmp_path / "cache", tmp_path / "work"
    cache.mkdir(exist_ok=True)
    (work / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    obj = cache / name.replace("/", "_")
    obj.write_text(text)
    obj.chmod(0o444)
    os.link(obj, work / name)
    return obj, work / name


def test_a_linked_file_is_replaced_and_the_cache_object_stays(tmp_path):
    obj, f = linked(tmp_path, "gate.json", "old")
    write_text(f, "new")
    assert f.read_text() == "new" and obj.read_text() == "old" and obj.stat().st_nlink == 1
    assert sorted(os.listdir(f.parent)) == ["gate.json"]          # no temporary file left
    with pytest.raises(RuntimeError):
        with replacing(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert f.read_text() == "new" and sorted(os.listdir(f.parent)) == ["gate.json"]


def test_a_re_evaluation_over_linked_outputs_leaves_the_cache_intact(tmp_path):
    obj_m, metrics = linked(tmp_path, "metrics.json", json.dumps({"val": {"mAP": 0.1}}))
    obj_t, _ = linked(tmp_path, "eval/thresholds.json", json.dumps({"split": "val", "thresholds": [0.5]}))
    write_evaluation(metrics.parent, {"val": {"mAP": 0.2}}, [0.3], "val")
    assert json.loads(metrics.read_text())["val"]["mAP"] == 0.2
    assert json.loads(obj_m.read_text())["val"]["mAP"] == 0.1
    assert json.loads(obj_t.read_text())["thresholds"] == [0.5]
