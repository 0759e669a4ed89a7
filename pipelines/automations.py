"""Prefect automations of the project: retrain when drift is detected.

The `drift-report` flow (pipelines/drift.py) emits `cxrlt.drift.detected` on the resource
`cxrlt.model.<tag>` when the share of drifted columns reaches its threshold. `ensure_drift_automation`
makes the server answer that event by running a train-eval deployment:

    from pipelines.automations import ensure_drift_automation
    ensure_drift_automation("train-eval/demo")          # with PREFECT_API_URL pointing at the server

or `python -m pipelines.automations --deployment train-eval/demo`. The deployment must exist (it is made by
`python -m pipelines.serve`; automations run deployments by id). Calling it again updates the automation
of that name instead of adding a second one, so it is safe at every start of the serving process.
Automations act through the server: the deployment runs when its runner or worker picks the run up.
"""

from __future__ import annotations

import argparse

from pipelines.drift import DRIFT_EVENT

AUTOMATION_NAME = "cxrlt-retrain-on-drift"


def drift_automation(deployment_id, *, name: str = AUTOMATION_NAME, model_tag: str | None = None,
                     parameters: dict | None = None, description: str = ""):
    """The automation (not yet sent to a server): on `cxrlt.drift.detected` for `model_tag` (any model
    when None) run the deployment `deployment_id` with `parameters` (None: the deployment's own)."""
    from prefect.automations import AutomationCore, EventTrigger, Posture, RunDeployment

    resource = f"cxrlt.model.{model_tag}" if model_tag else "cxrlt.model.*"
    return AutomationCore(
        name=name, enabled=True, tags=["cxrlt"],
        description=description or f"Run a train-eval deployment when {DRIFT_EVENT} is emitted for {resource}",
        trigger=EventTrigger(expect={DRIFT_EVENT}, match={"prefect.resource.id": resource},
                             posture=Posture.Reactive, threshold=1),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters=parameters)])


def ensure_drift_automation(deployment: str = "train-eval/demo", *, name: str = AUTOMATION_NAME,
                            model_tag: str | None = None, parameters: dict | None = None):
    """Create, or update in place, the automation `name`: on `cxrlt.drift.detected` (for `model_tag`, or any
    model) run `deployment` ('<flow name>/<deployment name>', e.g. 'train-eval/demo') with `parameters`.

    Idempotent by name: an automation of that name is updated (further ones of the same name are deleted);
    none is created twice. Returns the automation as the server holds it. Raises ValueError when the
    deployment does not exist."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    if deployment.count("/") != 1:
        raise ValueError(f"deployment is '<flow name>/<deployment name>' (e.g. 'train-eval/demo'), got {deployment!r}")
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(f"no deployment {deployment!r} on the Prefect server: start `python -m pipelines.serve` "
                             "(or deploy train-eval) first") from None
        wanted = drift_automation(dep.id, name=name, model_tag=model_tag, parameters=parameters)
        existing = client.read_automations_by_name(name)
        if existing:
            client.update_automation(existing[0].id, wanted)
            for extra in existing[1:]:
                client.delete_automation(extra.id)
            return client.read_automation(existing[0].id)
        return client.read_automation(client.create_automation(wanted))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Create or update the retrain-on-drift automation")
    ap.add_argument("--deployment", default="train-eval/demo", help="'<flow>/<deployment>' to run on drift")
    ap.add_argument("--name", default=AUTOMATION_NAME, help=f"automation name (default: {AUTOMATION_NAME})")
    ap.add_argument("--tag", help="only drift of this model tag (default: any model)")
    a = ap.parse_args(argv)
    auto = ensure_drift_automation(a.deployment, name=a.name, model_tag=a.tag)
    print(f"automation {auto.name} ({auto.id}): on {DRIFT_EVENT} run {a.deployment}")


if __name__ == "__main__":
    main()
