"""`cxrlt demo-data | fingerprint | manifest | prepare`: the data a model is trained on (the synthetic demo, the
image root's fingerprint, a checked patient-split manifest of CXR-LT, NIH or PadChest, and the resized cache)."""

from __future__ import annotations

import json

from cxrlt.cli.common import add_command, add_params, overrides


def cmd_demo_data(a):
    from cxrlt.data.demo.generate import generate_demo

    summary = generate_demo(a.out, n_studies=a.studies, seed=a.seed, layout=a.layout,
                            min_test_positives=a.min_test_positives, min_train_positives=a.min_train_positives)
    print(json.dumps(summary, indent=2, default=str))


def cmd_fingerprint(a):
    from cxrlt.data.fingerprint import fingerprint_images

    r = fingerprint_images(a.images, a.out, workers=a.workers, progress=not a.quiet)
    print(f"images: {r['files']} files, {r['bytes'] / 1e9:.2f} GB, {r['hashed']} hashed (changed or new) "
          f"-> {a.out} ({r['digest'][:12]})")


def cmd_manifest(a):
    from cxrlt.config import load_config
    from cxrlt.data.layouts import build_layout_manifest, detect_layout

    d = load_config(a.params, overrides(a.set)).data
    layout = a.layout or detect_layout(a.labels)
    m = build_layout_manifest(layout, a.labels, a.images, a.out, task=a.task or d.task, year=a.year,
                              val_fraction=d.val_fraction, test_fraction=a.test_fraction, seed=d.seed,
                              check_images=not a.no_check_images, zero_shot=tuple(d.zero_shot))
    groups = list(m.label_space.groups().values()) if m.label_space.n_train else []
    print(f"manifest ({layout}): {len(m.frame)} images, {m.frame['study_id'].nunique()} studies, "
          f"{m.frame['subject_id'].nunique()} patients, {len(m.label_space)} labels (head/medium/tail by share "
          f"{'/'.join(str(groups.count(g)) for g in ('head', 'medium', 'tail'))}) -> {a.out}")
    for note in m.meta.get("warnings", []):
        print(f"  note: {note}")


def cmd_prepare(a):
    from cxrlt.config import load_config
    from cxrlt.data.prepare import prepare_cache

    size = a.size or load_config(a.params, overrides(a.set)).data.image_size
    print(f"cache: {prepare_cache(a.manifest, a.out, size=size)}")


def add_parsers(sub) -> None:
    """Add this group's subcommands to the `cxrlt` parser."""
    p = add_command(sub, "demo-data", cmd_demo_data, "generate the synthetic demo data set (CXR-LT 2024 layout, or NIH / PadChest)")
    p.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--layout", default="cxr-lt-2024", choices=["cxr-lt-2024", "nih", "padchest"],
                   help="release layout to write (default: cxr-lt-2024)")
    p.add_argument("--studies", type=int, default=3000, help="number of studies (default: 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-test-positives", type=int, metavar="N",
                   help="studies per label in the test split (default 2); more lifts the tail's test prevalence "
                        "above its real share so that the tail can get an interval (the research matrix)")
    p.add_argument("--min-train-positives", type=int, metavar="N",
                   help="studies per label in the training split (default 4); more keeps the tail rare but "
                        "learnable at demo size, as it is in MIMIC-CXR (the research matrix)")

    p = add_command(sub, "fingerprint", cmd_fingerprint, "fingerprint an image root (what the pipeline depends on "
                    "instead of every image): files whose size, mtime and inode are unchanged are not read again")
    p.add_argument("--images", required=True, help="image root (e.g. MIMIC-CXR-JPG, the folder holding files/)")
    p.add_argument("--out", required=True, help="fingerprint file to write (JSON); its state file goes beside it")
    p.add_argument("--workers", type=int, default=8, help="threads reading and hashing changed files (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add_command(sub, "manifest", cmd_manifest, "validate label files + images (CXR-LT, NIH ChestX-ray14 or PadChest) and "
            "write a patient-split manifest")
    p.add_argument("--labels", required=True, help="folder with the label files (CXR-LT CSVs, NIH "
                   "Data_Entry_2017_v2020.csv, or the PadChest labels CSV)")
    p.add_argument("--images", required=True, help="image root: MIMIC-CXR-JPG (holding files/), NIH's PNG folder, "
                   "or PadChest's folder of numbered image folders")
    p.add_argument("--out", required=True, help="manifest folder to write")
    p.add_argument("--layout", choices=["cxr-lt-2024", "nih", "padchest"],
                   help="release layout (default: detected from the files in --labels)")
    p.add_argument("--task", choices=["task1", "task2", "task3", "2023"],
                   help="CXR-LT label space (default: params data.task)")
    p.add_argument("--year", type=int, default=2024, choices=[2023, 2024], help="CXR-LT edition (default: 2024)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="NIH without its split files, PadChest: share of patients held out for test (default: 0.2)")
    p.add_argument("--no-check-images", action="store_true", help="skip the check that every image exists")
    add_params(p)

    p = add_command(sub, "prepare", cmd_prepare, "write a resized image cache in a new folder (sources are never modified)")
    p.add_argument("--manifest", required=True, help="manifest folder")
    p.add_argument("--out", required=True, help="cache folder (new; not inside the source)")
    p.add_argument("--size", type=int, help="square side in pixels (default: params data.image_size)")
    add_params(p)
