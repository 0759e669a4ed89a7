"""`cxrlt train | evaluate | gate | models`: a variant trained into an artefact, scored on every split, its
input gate (re)fitted, and the model architectures there are."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxrlt.cli.common import add_command, add_params, overrides


def cmd_train(a):
    from cxrlt.config import load_config
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.engine import distributed, train

    if a.gpus < 1:
        raise ValueError(f"--gpus is {a.gpus}: give the number of GPUs to train on (1 or more)")
    if a.gpus > 1 and distributed.world_size() == 1:  # this process starts torchrun, which starts the trainers
        again = ["--variant", a.variant, "--manifest", a.manifest, "--params", a.params,
                 *(["--out", a.out] * bool(a.out)), *(["--resume"] * a.resume), *(["--quiet"] * a.quiet),
                 *[x for pair in a.set or [] for x in ("--set", pair)]]
        return distributed.launch(a.gpus, [str(x) for x in again])
    cfg = load_config(a.params, overrides(a.set))
    out = train(cfg.variant(a.variant), cfg.data, load_manifest(a.manifest), a.out or Path("models") / a.variant,
                progress=not a.quiet, resume=a.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"artefact: {out}")


def cmd_evaluate(a):
    from cxrlt.config import load_config
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.engine import evaluate

    cfg = load_config(a.params, overrides(a.set))  # only `eval`: the image size is the artefact's own
    res = evaluate(a.artefact, load_manifest(a.manifest), cfg.eval, progress=not a.quiet, other_data=a.other_data)
    if any(m.get("cross_dataset") for m in res.values()):
        print("scored on ANOTHER data set than the model was trained with (--other-data), with its own thresholds; "
              "results in eval/other-data/, its own evaluation unchanged")
    for split, m in res.items():
        print(f"{split:>5}: mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  mF1 {m['mF1']:.4f}  "
              f"head/medium/tail mAP {m.get('mAP_head', float('nan')):.4f} / {m.get('mAP_medium', float('nan')):.4f}"
              f" / {m.get('mAP_tail', float('nan')):.4f}")


def cmd_gate(a):
    from cxrlt.data.manifest_io import load_manifest
    from cxrlt.gate import calibrate_artefact

    g = calibrate_artefact(a.artefact, load_manifest(a.manifest), frr=a.frr, max_train=a.max_train, seed=a.seed,
                           device=a.device, log=None if a.quiet else print, other_data=a.other_data)
    rec = {k: v for k, v in g.describe().items() if k != "reference"}
    if "fallback" in rec:
        rec["fallback"] = {k: v for k, v in rec["fallback"].items() if k != "reference"}
    print(json.dumps(rec, indent=2))


def cmd_models(a):
    from cxrlt.models import list_models

    print("\n".join(list_models(a.pattern)))


def add_parsers(sub) -> None:
    """Add this group's subcommands to the `cxrlt` parser."""
    p = add_command(sub, "train", cmd_train, "train one variant from params.yaml into a model artefact")
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
    add_params(p)

    p = add_command(sub, "evaluate", cmd_evaluate, "score an artefact per image on val/dev/test at the image size it was "
            "trained at; tune thresholds on val and apply them unchanged to dev/test")
    p.add_argument("--artefact", required=True, help="artefact folder (models/<variant>)")
    p.add_argument("--manifest", required=True, help="manifest folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--other-data", action="store_true", help="score it on a manifest whose splits are not "
                   "the ones it was trained with (refused otherwise: its validation patients may be training patients); "
                   "uses its own thresholds, writes to eval/other-data/, marks every result")
    add_params(p)

    p = add_command(sub, "gate", cmd_gate, "(re)calibrate an artefact's OOD input gate: fitted on the manifest's train images, "
            "threshold on val; written to ARTEFACT/eval/gate.json (`cxrlt evaluate` does this too)")
    p.add_argument("artefact", help="artefact folder (models/<variant>)")
    p.add_argument("--manifest", required=True, help="the manifest the model was trained on (train and val splits)")
    p.add_argument("--frr", type=float, default=0.01,
                   help="share of genuine images the gate may refuse (default: 0.01)")
    p.add_argument("--max-train", type=int, default=4000,
                   help="training images to fit on (seeded sample; default: 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--other-data", action="store_true", help="fit it on a manifest whose splits are not the "
                   "ones the model was trained with (refused otherwise)")
    p.add_argument("--quiet", action="store_true")

    p = add_command(sub, "models", cmd_models, "list the registered model architectures")
    p.add_argument("pattern", nargs="?", default="*")
