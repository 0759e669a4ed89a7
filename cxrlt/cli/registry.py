"""`cxrlt registry ...`: the model registry's subcommands (list, register, promote, rollback, stage, show,
history, serving). Errors are RegistryError / ValueError, which `cxrlt.cli.main.main` prints as one line."""

from __future__ import annotations

import json

NAME_HELP = "model name in the store (default: cxrlt)"


def _list(a):
    from cxrlt.registry import store

    rows = store.list_registered(a.name)
    if not rows:
        print(f"no registered {a.name} models (train and register some: `make demo`)")
    for r in rows:
        mark = "*" if r["serving"] else " "
        mAP = "   -  " if r["val_mAP"] is None else f"{r['val_mAP']:.4f}"
        print(f"{mark} {r['tag']:<32} {r['stage']:<10} {r['variant']:<22} {r['loss']:<5} val mAP {mAP}  "
              f"{r['created']}" + ("  [synthetic]" if r["synthetic"] else ""))
    print("* = served")


def _register(a):
    from cxrlt.registry import store

    print(store.register(a.artefact, name=a.name))


def _promote(a):
    from cxrlt.registry import store

    if a.tag:
        print(f"serving {store.set_serving(a.tag, reason='promoted by hand')}")
        return
    # the best among models validated on one data set (see store.promote_best)
    from cxrlt.provenance import data_version

    version = data_version(a.manifest)["manifest_md5"] if a.manifest else None
    if a.manifest and version is None:
        raise ValueError(f"no manifest.csv in {a.manifest}: pass the manifest folder the models were "
                         "validated on (e.g. prepared/cache)")
    print(f"serving {store.promote_best(a.name, data_version=version)}")


def _rollback(a):
    from cxrlt.registry import store

    tag = store.rollback(to=a.to, name=a.name)
    ev = store.last_event(tag.split(":", 1)[0])
    print(f"serving {tag} (was {ev['previous']})")


def _stage(a):
    from cxrlt.registry import store

    store.set_stage(a.tag, a.stage)
    print(f"{a.tag}: {store.stage_of(a.tag)}")


def _history_lines(hist: list[dict]) -> list[str]:
    return [f"{h['time'][:19]}  {h['action']:<8}  {h['previous'] or '-'} -> {h['tag']}  ({h['reason']})"
            for h in hist]


def _show(a):
    from cxrlt.registry import store

    d = store.describe(a.tag)
    hist = store.history(d["name"])
    if a.json:
        print(json.dumps({**d, "card": store.model_card(d["tag"]), "history": hist}, indent=2))
        return
    print(f"{d['tag']}  stage: {d['stage']}" + ("  (served)" if d["serving"] else ""))
    print()
    print(store.model_card(d["tag"]))
    print(f"## Serving history of {d['name']} (oldest first)")
    print()
    print("\n".join(_history_lines(hist)) or "never served")


def _history(a):
    from cxrlt.registry import store

    hist = store.history(a.name)
    if a.json:
        print(json.dumps(hist, indent=2))
        return
    print(f"serving history of {a.name}, oldest first" + ("" if hist else ": nothing served yet"))
    for line in _history_lines(hist):
        print(line)


def _serving(a):
    from cxrlt.registry import store

    print(store.serving_tag(name=a.name))


def add_parsers(sub) -> None:
    """`cxrlt registry ACTION ...`: one sub-parser per action, each with its own --help."""
    desc = ("the model registry on the BentoML model store: stages (candidate, production = served, archived), "
            "serving history with rollback, a model card per model")
    p = sub.add_parser("registry", help=desc, description=desc)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def act(name, fn, help_, with_name=True):
        q = acts.add_parser(name, help=help_, description=help_)
        q.set_defaults(fn=fn)
        if with_name:
            q.add_argument("--name", default="cxrlt", help=NAME_HELP)
        return q

    act("list", _list, "registered models, newest first: stage, validation mAP; * = served")
    q = act("register", _register, "copy an evaluated artefact into the store (stage: candidate), with its model card")
    q.add_argument("artefact", help="evaluated artefact folder (models/<variant>)")
    q = act("promote", _promote, "serve the best model by validation mAP, or the given tag (it becomes production; "
            "the model it replaces is archived)")
    q.add_argument("tag", nargs="?", help="model to serve (default: the best on one data set)")
    q.add_argument("--manifest", help="the best among models validated on this manifest's data (default: the "
                                      "served model's data, or the only data set registered)")
    q = act("rollback", _rollback, "serve the model served before the current one; again walks back another one")
    q.add_argument("--to", metavar="TAG", help="roll back to this earlier served model instead (its name is the "
                                               "tag's; --name is then ignored)")
    q = act("stage", _stage, "set a model's stage: production serves it; candidate or archived by hand (the served "
            "model leaves production only when another is served)", with_name=False)
    q.add_argument("tag", help="model tag (name:version)")
    q.add_argument("stage", help="candidate, production or archived")
    q = act("show", _show, "a model's stage, model card and its name's serving history", with_name=False)
    q.add_argument("tag", help="model tag (name:version)")
    q.add_argument("--json", action="store_true", help="as one JSON object (describe + card + history)")
    q = act("history", _history, "the serving history: every promotion, rollback and manual change, oldest first")
    q.add_argument("--json", action="store_true", help="as JSON")
    q = act("serving", _serving, "the tag the service serves: the production model marked most recently, of "
            "any name", with_name=False)
    q.add_argument("--name", help="that name's production model instead")
