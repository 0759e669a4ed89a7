"""`cxrlt predict | send`: one study scored by the served (or a given) model, and demo traffic sent to the
running service."""

from __future__ import annotations

import json
import os
import sys

from cxrlt.cli.common import add_command


def cmd_predict(a):
    from cxrlt.data.image_info import ImageDecodeError
    from cxrlt.data.images import read_image
    from cxrlt.gate import check_image
    from cxrlt.inference import Predictor

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
    probs, (oods,) = p.predict_gated([imgs], [views])
    res = p.describe(probs[0])
    # the input gate's verdict per image, as the service gives it (the CLI reports; it does not refuse)
    res["gate"] = [(check_image(i, img) + [ood]).as_dict() for i, img, ood in zip(infos, imgs, oods)]
    for f, g in zip(a.images, res["gate"]):
        if not g["passed"]:
            print(f"warning: the service would refuse {f}: {g['reason']}", file=sys.stderr)
    if a.finding:
        res["zero_shot"] = p.score_findings(imgs, a.finding, views, ensemble=a.ensemble)
    print(json.dumps(res, indent=2))
    g = res["guarantee"]
    if g["available"]:
        print(f"findings with a guarantee: confirmed {g['confirmed'] or 'none'}; uncertain {g['uncertain'] or 'none'}",
              file=sys.stderr)
    print(g["statement"], file=sys.stderr)


def cmd_send(a):
    from cxrlt.client import send_studies

    print(json.dumps(send_studies(a.url, a.manifest, a.split, a.studies, a.seed), indent=2))


def add_parsers(sub) -> None:
    """Add this group's subcommands to the `cxrlt` parser."""
    p = add_command(sub, "predict", cmd_predict, "score one study (1-4 images) with the served or a given model")
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

    p = add_command(sub, "send", cmd_send, "send studies of a manifest split to the running service (demo traffic)")
    p.add_argument("--manifest", required=True, help="manifest folder (its images are sent as files)")
    p.add_argument("--split", default="test")
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=os.environ.get("CXRLT_SERVICE_URL", "http://127.0.0.1:3000"),
                   help="service URL (default: $CXRLT_SERVICE_URL or http://127.0.0.1:3000)")
