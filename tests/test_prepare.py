"""The resized cache: never touches the sources, is idempotent, refuses unsafe folders, names bad images."""

import hashlib
import os
import shutil
import stat

import pandas as pd
import pytest
from PIL import Image

from cxrlt.data.demo.generate import generate_demo
from cxrlt.data.parallel import run_chunked
from cxrlt.data.manifest import build_manifest
from cxrlt.data.manifest_io import ManifestError, load_manifest
from cxrlt.data.prepare import _resize_chunk, prepare_cache


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    generate_demo(root / "demo", n_studies=20, seed=2, workers=1, progress=False)
    build_manifest(root / "demo" / "cxr-lt-2024", root / "demo" / "mimic-cxr-jpg", root / "manifest")
    return root


def snapshot(root):
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


def set_tree_mode(root, file_mode, dir_mode):
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), file_mode)
        os.chmod(dirpath, dir_mode)


def test_cache_from_a_read_only_source_leaves_it_untouched(source, tmp_path):
    set_tree_mode(source, 0o444, 0o555)
    try:
        before = snapshot(source)
        out = prepare_cache(source / "manifest", tmp_path / "cache", size=48, workers=1, progress=False)
        after = snapshot(source)
    finally:
        set_tree_mode(source, 0o644, 0o755)
    assert after == before                                       # bytes, mtimes and modes
    m, cached = load_manifest(source / "manifest"), load_manifest(out)
    assert cached.image_root == (tmp_path / "cache").resolve()
    pd.testing.assert_frame_equal(cached.frame, m.frame)
    assert cached.meta["cache"]["size"] == 48 and cached.label_space == m.label_space
    for rel in m.frame["path"]:
        with Image.open(cached.image_path(rel)) as im:
            assert im.size == (48, 48) and im.mode == "L"
    assert not list((tmp_path / "cache").rglob("*.part"))
    # a second run skips what is cached; a new size redoes it
    times = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.jpg")}
    prepare_cache(source / "manifest", tmp_path / "cache", size=48, workers=1, progress=False)
    assert times == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.jpg")}
    prepare_cache(source / "manifest", tmp_path / "cache", size=32, workers=1, progress=False)
    with Image.open(cached.image_path(m.frame["path"].iloc[0])) as im:
        assert im.size == (32, 32)


def test_refuses_folders_that_could_touch_the_sources(source, tmp_path):
    images = source / "demo" / "mimic-cxr-jpg"
    for bad in (images, images / "cache", images / "files" / "p10", source / "manifest"):
        existed = bad.exists()
        with pytest.raises(ManifestError, match="What to do"):
            prepare_cache(source / "manifest", bad, size=32, workers=1, progress=False)
        assert bad.exists() == existed
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(images / "files", linked / "files")
    with pytest.raises(ManifestError, match="linked into the source"):
        prepare_cache(source / "manifest", linked, size=32, workers=1, progress=False)


def test_unreadable_images_are_listed(source, tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(source / "demo", demo)
    m = load_manifest(source / "manifest")
    broken = m.frame["path"].iloc[3]
    (demo / "mimic-cxr-jpg" / broken).write_bytes(b"not a jpeg")
    build_manifest(demo / "cxr-lt-2024", demo / "mimic-cxr-jpg", tmp_path / "manifest")
    with pytest.raises(ManifestError) as err:
        prepare_cache(tmp_path / "manifest", tmp_path / "cache", size=32, workers=1, progress=False)
    assert "1 image(s) could not be read" in str(err.value) and broken in str(err.value)
    assert not (tmp_path / "cache" / "manifest.csv").exists()    # no manifest for an incomplete cache
    assert (tmp_path / "cache" / m.frame["path"].iloc[0]).is_file()


def test_worker_processes_return_every_failure(tmp_path):
    jobs = [(str(tmp_path / f"missing{i}.jpg"), str(tmp_path / "out" / f"{i}.jpg")) for i in range(130)]
    results = run_chunked(_resize_chunk, jobs, tmp_path, 16, workers=2, progress=False, desc="test")
    failed = [f for chunk in results for f in chunk]
    assert len(failed) == 130 and all("missing" in f for f in failed)


def test_bad_size_is_refused(source, tmp_path):
    with pytest.raises(ValueError, match="at least 8"):
        prepare_cache(source / "manifest", tmp_path / "c", size=2)


def test_a_cache_from_an_older_reader_keeps_its_jpegs(source, tmp_path):
    """JPEG sources give the same pixels with every reader version: an older cache's JPEGs are not redone."""
    import json

    out = prepare_cache(source / "manifest", tmp_path / "cache", size=24, workers=1, progress=False)
    meta = json.loads((out / "manifest.json").read_text())
    del meta["cache"]["reader"]
    (out / "manifest.json").write_text(json.dumps(meta))
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    prepare_cache(source / "manifest", out, size=24, workers=1, progress=False)
    assert times == {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}


def test_16_bit_sources_are_cached_stretched_not_clipped(tmp_path):
    import numpy as np

    src = tmp_path / "x.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(src)   # up to 61425
    dst = tmp_path / "out" / "x.png"
    assert _resize_chunk([(str(src), str(dst))], str(tmp_path), 32) == []
    with Image.open(dst) as im:
        a = np.asarray(im, dtype=float)
    assert im.format == "JPEG" and a.min() < 5 and a.max() > 250 and a.mean() == pytest.approx(127.5, abs=5)
