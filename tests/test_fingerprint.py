"""The image root's fingerprint (cxrlt/data/fingerprint.py): what the pipeline's stages depend on instead of
every image. Content decides it, times do not; an unchanged root is not read again."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cxrlt.data.fingerprint import fingerprint_images


def make_root(root, n=12):
    for i in range(n):
        d = root / "files" / f"p1{i % 3}" / f"p1{i % 3}00000{i}" / f"s5000000{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    return root


def fp(root, out):
    r = fingerprint_images(root, out, progress=False)
    assert json.loads(out.read_text()) == {k: r[k] for k in ("files", "bytes", "digest")}
    return r


def test_an_unchanged_root_is_walked_not_read(tmp_path):
    root = make_root(tmp_path / "images")
    first = fp(root, tmp_path / "fp.json")
    assert first["files"] == 12 and first["hashed"] == 12 and first["bytes"] == sum(100 + i for i in range(12))
    again = fp(root, tmp_path / "fp.json")
    assert again["hashed"] == 0 and again["digest"] == first["digest"]


def test_a_copy_with_new_times_hashes_again_and_fingerprints_the_same(tmp_path):
    root = make_root(tmp_path / "images")
    first = fp(root, tmp_path / "fp.json")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)   # new files, new mtimes
    for p in copy.rglob("*.jpg"):
        os.utime(p, ns=(1, 1))
    moved = fp(copy, tmp_path / "fp.json")
    assert moved["hashed"] == 12 and moved["digest"] == first["digest"]
    os.utime(next(copy.rglob("*.jpg")), ns=(2, 2))                # touched, content the same
    touched = fp(copy, tmp_path / "fp.json")
    assert touched["hashed"] == 1 and touched["digest"] == first["digest"]


@pytest.mark.parametrize("change", ["edit", "add", "remove", "rename"])
def test_any_change_of_content_or_names_changes_it(tmp_path, change):
    root = make_root(tmp_path / "images")
    before = fp(root, tmp_path / "fp.json")
    img = sorted(root.rglob("*.jpg"))[3]
    if change == "edit":          # same size, other bytes: the mtime moves, so it is read again
        img.write_bytes(b"\xff" * img.stat().st_size)
    elif change == "add":
        (img.parent / "extra.jpg").write_bytes(b"x")
    elif change == "remove":
        img.unlink()
    else:
        img.rename(img.with_name("other.jpg"))
    after = fp(root, tmp_path / "fp.json")
    assert after["digest"] != before["digest"]
    assert after["hashed"] == {"edit": 1, "add": 1, "remove": 0, "rename": 1}[change]


def test_dot_files_do_not_count_and_odd_names_do(tmp_path):
    root = make_root(tmp_path / "images", n=3)
    before = fp(root, tmp_path / "fp.json")
    (root / ".DS_Store").write_bytes(b"finder")
    (root / "files" / ".cache").mkdir()
    (root / "files" / ".cache" / "x").write_bytes(b"x")
    assert fp(root, tmp_path / "fp.json")["digest"] == before["digest"]
    (root / "files" / "tab\tname.jpg").write_bytes(b"t")
    odd = fp(root, tmp_path / "fp.json")
    assert odd["files"] == 4 and fp(root, tmp_path / "fp.json")["hashed"] == 0   # its state line reads back


def test_a_missing_root_says_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="paths.images"):
        fingerprint_images(tmp_path / "nowhere", tmp_path / "fp.json", progress=False)
