"""`cxrlt` command line: every pipeline step as a subcommand, `main(argv)` callable from tests.

DVC stages, Prefect tasks and people all call these same functions. Expected failures (bad data,
missing files, unknown names) print one clear message and exit 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from .cli_registry import add_registry_parser

EXPECTED = (ValueError, KeyError, FileNotFoundError, RuntimeError)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--set takes key=value (e.g. train.epochs=1), got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_demo_data(a):
    from .data.demo import generate_demo

    summary = generate_demo(a.out, n_studies=a.studies, seed=a.seed, layout=a.layout)
    print(json.dumps(summary, indent=2, default=str))


def cmd_manifest(a):
    from .config import load_config
    from .data.layouts import build_layout_manifest, detect_layout

    d = load_config(a.params, _overrides(a.set)).data
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
    from .config import load_config
    from .data.prepare import prepare_cache

    size = a.size or load_config(a.params, _overrides(a.set)).data.image_size
    print(f"cache: {prepare_cache(a.manifest, a.out, size=size)}")


def cmd_train(a):
    from .config import load_config
    from .data.manifest import load_manifest
    from .engine import distributed, train

    if a.gpus < 1:
        raise ValueError(f"--gpus is {a.gpus}: give the number of GPUs to train on (1 or more)")
    if a.gpus > 1 and distributed.world_size() == 1:  # this process starts torchrun, which starts the trainers
        again = ["--variant", a.variant, "--manifest", a.manifest, "--params", a.params,
                 *(["--out", a.out] * bool(a.out)), *(["--resume"] * a.resume), *(["--quiet"] * a.quiet),
                 *[x for pair in a.set or [] for x in ("--set", pair)]]
        return distributed.launch(a.gpus, [str(x) for x in again])
    cfg = load_config(a.params, _overrides(a.set))
    out = train(cfg.variant(a.variant), cfg.data, load_manifest(a.manifest), a.out or Path("models") / a.variant,
                progress=not a.quiet, resume=a.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"artefact: {out}")


def cmd_evaluate(a):
    from .config import load_config
    from .data.manifest import load_manifest
    from .engine import evaluate

    cfg = load_config(a.params, _overrides(a.set))  # only `eval`: the image size is the artefact's own
    res = evaluate(a.artefact, load_manifest(a.manifest), cfg.eval, progress=not a.quiet)
    for split, m in res.items():
        print(f"{split:>5}: mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  mF1 {m['mF1']:.4f}  "
              f"head/medium/tail mAP {m.get('mAP_head', float('nan')):.4f} / {m.get('mAP_medium', float('nan')):.4f}"
              f" / {m.get('mAP_tail', float('nan')):.4f}")


def cmd_predict(a):
    from .data.images import ImageDecodeError, read_image
    from .inference import Predictor

    from .gate import check_image

    p = Predictor.from_path(a.artefact) if a.artefact else Predictor.from_registry(a.tag)
    imgs, infos = [], []
    for f in a.images:
        try:  # read at the model's input size exactly as the training cache and the service read it
            img, info = read_image(f, size=p.image_size)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{f}: {e.problem}", e.todo) from None
        imgs.append(img)
        infos.append(info)
    views = a.views if a.views else [i.view for i in infos]  # DICOM ViewPosition; None (unknown) otherwise
    res = p.describe(p.predict([imgs], [views])[0])
    # the input gate's verdict per image, as the service gives it (the CLI reports; it does not refuse)
    res["gate"] = [(check_image(i, img) + [ood]).as_dict()
                   for i, img, ood in zip(infos, imgs, p.gate_images(imgs, views))]
    for f, g in zip(a.images, res["gate"]):
        if not g["passed"]:
            print(f"warning: the service would refuse {f}: {g['reason']}", file=sys.stderr)
    if a.finding:
        res["zero_shot"] = p.score_findings(imgs, a.finding, views, ensemble=a.ensemble)
    print(json.dumps(res, indent=2))


def cmd_drift(a):
    from .monitoring import run_drift

    print(json.dumps(run_drift(log_path=a.log, out_dir=a.out, tag=a.tag, last_n=a.last), indent=2, default=str))


def cmd_compare(a):
    from .report import write_report

    missing = [d for d in a.artefacts if not (Path(d) / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"not evaluated artefact folder(s): {missing}; run `cxrlt evaluate` first")
    print(f"report: {write_report(a.artefacts, a.out, manifest=a.manifest, split=a.split, n_boot=a.bootstrap)}")


def cmd_submit(a):
    """Challenge CSV from an artefact's per-image predictions of a split, columns in a task's order."""
    import pandas as pd

    from .labels import LABEL_SETS
    from .metrics import write_submission

    src = Path(a.artefact) / "eval" / f"predictions_{a.split}.csv"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: run `cxrlt evaluate` on a manifest with split {a.split!r}")
    pred = pd.read_csv(src)
    names = list(LABEL_SETS[a.task])
    missing = [n for n in names if n not in pred.columns]
    if missing:
        raise ValueError(f"the model does not score {missing} of {a.task}; pick the task it was trained for")
    print(f"submission: {write_submission(a.out, pred['dicom_id'], pred[names].to_numpy(), names)}")


def cmd_send(a):
    from .client import send_studies

    print(json.dumps(send_studies(a.url, a.manifest, a.split, a.studies, a.seed), indent=2))


def cmd_gate(a):
    from .data.manifest import load_manifest
    from .gate import calibrate_artefact

    g = calibrate_artefact(a.artefact, load_manifest(a.manifest), frr=a.frr, max_train=a.max_train, seed=a.seed,
                           device=a.device, log=None if a.quiet else print)
    print(json.dumps({k: v for k, v in g.describe().items() if k != "reference"}, indent=2))


def cmd_models(a):
    from .models import list_models

    print("\n".join(list_models(a.pattern)))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxrlt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    def params(p):
        p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. train.epochs=1")

    p = add("demo-data", cmd_demo_data, "generate the synthetic demo data set (CXR-LT 2024 layout, or NIH / PadChest)")
    p.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--layout", default="cxr-lt-2024", choices=["cxr-lt-2024", "nih", "padchest"],
                   help="release layout to write (default: cxr-lt-2024)")
    p.add_argument("--studies", type=int, default=3000, help="number of studies (default: 3000)")
    p.add_argument("--seed", type=int, default=0)

    p = add("manifest", cmd_manifest, "validate label files + images (CXR-LT, NIH ChestX-ray14 or PadChest) and "
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
    params(p)

    p = add("prepare", cmd_prepare, "write a resized image cache in a new folder (sources are never modified)")
    p.add_argument("--manifest", required=True, help="manifest folder")
    p.add_argument("--out", required=True, help="cache folder (new; not inside the source)")
    p.add_argument("--size", type=int, help="square side in pixels (default: params data.image_size)")
    params(p)

    p = add("train", cmd_train, "train one variant from params.yaml into a model artefact")
    p.add_argument("--variant", required=True, help="variant name from params.yaml `variants` (a seeded one: "
                   "<name>-seed<k>)")
    p.add_argument("--manifest", required=True, help="manifest folder (usually the prepared cache)")
    p.add_argument("--out", help="artefact folder (default: models/<variant>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run whose checkpoint "
                   "(train_state.pt) is in the artefact folder; starts afresh when there is none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--gpus", type=int, default=1, help="train on N GPUs of this machine with DistributedDataParallel "
                   "(starts torchrun; train.batch_size stays the global batch). Several machines: torchrun "
                   "--nnodes ... -m cxrlt train ...")
    params(p)

    p = add("evaluate", cmd_evaluate, "score an artefact per image on val/dev/test at the image size it was "
            "trained at; tune thresholds on val and apply them unchanged to dev/test")
    p.add_argument("--artefact", required=True, help="artefact folder (models/<variant>)")
    p.add_argument("--manifest", required=True, help="manifest folder")
    p.add_argument("--quiet", action="store_true")
    params(p)

    add_registry_parser(sub)  # its own module: one sub-parser per action

    p = add("predict", cmd_predict, "score one study (1-4 images) with the served or a given model")
    p.add_argument("images", nargs="+", help="image files of one study: PNG, JPEG or DICOM (.dcm)")
    p.add_argument("--views", nargs="+",
                   help="view per image: frontal / lateral / unknown (default: a DICOM's ViewPosition, else unknown)")
    p.add_argument("--finding", action="append", metavar="TEXT",
                   help="also score a finding from its text, 'Name' or 'Name: description' (zero-shot; text-query "
                        "models only; scored in the prompt form the model was trained with; uncalibrated); "
                        "repeatable")
    p.add_argument("--ensemble", action="store_true",
                   help="with --finding: average the embeddings of several phrasings of each new finding (suits "
                        "template-trained heads; it scored lower with description-trained ones on the demo)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tag", help="registered model tag (default: the served one)")
    g.add_argument("--artefact", help="artefact folder instead of the registry")

    p = add("drift", cmd_drift, "Evidently drift report of logged predictions against validation predictions")
    p.add_argument("--log", help="prediction log (default: $CXRLT_PREDICTION_LOG or var/predictions/predictions.jsonl)")
    p.add_argument("--out", help="report folder (default: $CXRLT_REPORTS_DIR or reports/drift)")
    p.add_argument("--tag", help="model whose validation predictions are the reference (default: served)")
    p.add_argument("--last", type=int, help="only the last N logged predictions")

    p = add("compare", cmd_compare, "compare evaluated variants in one report (markdown, plots, CSV) with "
            "bootstrap confidence intervals, beside the published results")
    p.add_argument("artefacts", nargs="+", help="evaluated artefact folders, e.g. models/matrix/*")
    p.add_argument("--manifest", required=True, help="the manifest they were evaluated on")
    p.add_argument("--out", default="reports/compare", help="report folder (default: reports/compare)")
    p.add_argument("--split", default="test", help="split to compare on (default: test)")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples of patients for the 95%% basic intervals (default: 200)")

    p = add("submit", cmd_submit, "write the challenge's submission CSV (dicom_id + one column per label, "
            "by name) from an evaluated artefact")
    p.add_argument("--artefact", required=True, help="evaluated artefact folder")
    p.add_argument("--split", default="test", help="split whose predictions to submit (default: test)")
    p.add_argument("--task", default="task1", choices=["task1", "task2", "task3", "2023"],
                   help="column set and order of the submission (Task 2 columns are mapped by name)")
    p.add_argument("--out", required=True, help="CSV file to write")

    p = add("send", cmd_send, "send studies of a manifest split to the running service (demo traffic)")
    p.add_argument("--manifest", required=True, help="manifest folder (its images are sent as files)")
    p.add_argument("--split", default="test")
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=os.environ.get("CXRLT_SERVICE_URL", "http://127.0.0.1:3000"),
                   help="service URL (default: $CXRLT_SERVICE_URL or http://127.0.0.1:3000)")

    p = add("gate", cmd_gate, "(re)calibrate an artefact's OOD input gate: fitted on the manifest's train images, "
            "threshold on val; written to ARTEFACT/eval/gate.json (`cxrlt evaluate` does this too)")
    p.add_argument("artefact", help="artefact folder (models/<variant>)")
    p.add_argument("--manifest", required=True, help="the manifest the model was trained on (train and val splits)")
    p.add_argument("--frr", type=float, default=0.01,
                   help="share of genuine images the gate may refuse (default: 0.01)")
    p.add_argument("--max-train", type=int, default=4000,
                   help="training images to fit on (seeded sample; default: 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--quiet", action="store_true")

    p = add("models", cmd_models, "list the registered model architectures")
    p.add_argument("pattern", nargs="?", default="*")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EXPECTED as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cxrlt {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`cxrlt registry list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
