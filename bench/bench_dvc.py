"""Benchmark: what DVC costs per 50,000 image files, with the cache copied or linked.

The pipeline's `prepare` stage depends on the image root (DVC hashes it file by file) and writes the resized
cache (an output DVC saves into its own cache). At MIMIC-CXR-JPG's size (377,110 images) both costs matter.
For each cache link type it builds a fresh Git + DVC repository holding --files image-sized files, a
`prepare` stage that copies them to an output folder, and times:

  repro       the first `dvc repro` (hash the dependency, run the command, hash and save the output), minus
              the command's own time (measured alone), i.e. what DVC adds
  status      `dvc status` with nothing changed (hashes come from DVC's state database)
  changed     `dvc status` after one file of the dependency changed
  noop        `dvc repro` with nothing changed
  disk        what the repository holds: images + output + DVC's cache (hard links counted once)

Three ways in one run: `copy` (DVC's fallback where the file system has no reflinks, e.g. ext4),
`hardlink` (DVC's configuration for large data: the output is linked to the cache, not copied), and
`fingerprint` (hardlink, and the project's dvc.yaml shape: an always-run `cxrlt fingerprint` stage whose
small file the other stages depend on, instead of the image folder; its `status` figure includes running
the fingerprint, since `dvc status` alone cannot see an image change before it runs). Figures are per
50,000 files, and scaled linearly to MIMIC-CXR-JPG's count.

    python bench/bench_dvc.py [--files 50000] [--kb 16] [--ways copy,hardlink,fingerprint] [--json OUT]

50,000 files of 16 KB (0.8 GB) take about 10 minutes for the three ways on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIMIC_FILES = 377_110
PER = 50_000
COPY_CMD = "python -c \"import shutil; shutil.copytree('images', 'cache')\""
FINGERPRINT_CMD = f"{sys.executable} -m cxrlt fingerprint --images images --out images.json --quiet"


def run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def make_files(root: Path, n: int, kb: int) -> None:
    """n files of kb KiB in MIMIC's nesting (files/pXX/pSUBJECT/sSTUDY/IMAGE.jpg), random bytes."""
    block = os.urandom(kb * 1024)
    for i in range(n):
        d = root / "files" / f"p1{i % 10}" / f"p1{i % 10}{i // 100:06d}" / f"s5{i // 2:07d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:08d}.jpg").write_bytes(i.to_bytes(8, "little") + block[8:])


def disk_kb(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def one_way(way: str, template: Path, work: Path, n: int) -> dict:
    repo = work / way
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(dvc("init", "-q"), repo)
    run(dvc("config", "core.analytics", "false"), repo)
    run(dvc("config", "cache.type", "hardlink" if way == "fingerprint" else way), repo)
    shutil.copytree(template, repo / "images", copy_function=os.link)   # same inodes: creating them is not timed
    cmd_alone = run([sys.executable, "-c", "import shutil; shutil.copytree('images', 'cache_alone')"], repo)
    shutil.rmtree(repo / "cache_alone")
    if way == "fingerprint":  # the project's dvc.yaml: an always-run `images` stage, the rest depends on its file
        run(dvc("stage", "add", "-q", "-n", "images", "--always-changed", "-O", "images.json", FINGERPRINT_CMD), repo)
        run(dvc("stage", "add", "-q", "-n", "prepare", "-d", "images.json", "-o", "cache", COPY_CMD), repo)
        # `dvc status` alone cannot see an image change before the fingerprint runs: knowing costs both
        status_cmd = [["cxrlt-fingerprint"], dvc("status")]
    else:
        run(dvc("stage", "add", "-q", "-n", "prepare", "-d", "images", "-o", "cache", COPY_CMD), repo)
        status_cmd = [dvc("status")]

    def status_s() -> float:
        return sum(run(dvc("repro", "-q", "images") if c == ["cxrlt-fingerprint"] else c, repo) for c in status_cmd)

    repro = run(dvc("repro", "-q"), repo)
    status = status_s()
    first = next((repo / "images").rglob("*.jpg"))
    os.unlink(first)                                   # a changed source: new bytes, new inode
    first.write_bytes(b"changed" + os.urandom(64))
    changed = status_s()
    run(dvc("repro", "-q"), repo)
    noop = run(dvc("repro", "-q"), repo)
    images_kb = disk_kb(repo / "images")
    total_kb = disk_kb(repo)
    scale = PER / n
    return {"way": way, "files": n, "command_s": round(cmd_alone, 2),
            "repro_dvc_s_per_50k": round((repro - cmd_alone) * scale, 2), "status_s_per_50k": round(status * scale, 2),
            "changed_status_s_per_50k": round(changed * scale, 2), "noop_repro_s_per_50k": round(noop * scale, 2),
            "disk_over_images": round(total_kb / images_kb, 2),
            "mimic_repro_dvc_min": round((repro - cmd_alone) * MIMIC_FILES / n / 60, 1),
            "mimic_status_min": round(status * MIMIC_FILES / n / 60, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=PER)
    ap.add_argument("--kb", type=int, default=16, help="size of each file in KiB (a 256-px cached JPEG is ~16)")
    ap.add_argument("--ways", default="copy,hardlink,fingerprint",
                    help="DVC cache link types to compare, and `fingerprint`: hardlink with the project's image "
                         "fingerprint stage (cxrlt fingerprint) instead of the image folder as the dependency")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    try:
        template = work / "template"
        t0 = time.perf_counter()
        make_files(template, a.files, a.kb)
        print(f"{a.files} files of {a.kb} KiB written in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for way in a.ways.split(","):
            rows.append(one_way(way, template, work, a.files))
            print(json.dumps(rows[-1]), flush=True)
        a0 = rows[0]
        for b0 in rows[1:]:
            print(f"{b0['way']} vs {a0['way']}: DVC's repro cost x{b0['repro_dvc_s_per_50k'] / a0['repro_dvc_s_per_50k']:.2f}, "
                  f"status x{b0['status_s_per_50k'] / a0['status_s_per_50k']:.2f}, no-op repro "
                  f"x{b0['noop_repro_s_per_50k'] / a0['noop_repro_s_per_50k']:.2f}, disk "
                  f"x{b0['disk_over_images'] / a0['disk_over_images']:.2f} (of the images: {a0['disk_over_images']} -> "
                  f"{b0['disk_over_images']})")
        if a.json:
            a.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
