"""The drift-report flow on a real (temporary) Prefect server: artifacts, the drift event only over the
threshold, and the retrain-on-drift automation, all read back from the server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cxrlt.monitoring.history import drift_history
from cxrlt.monitoring.log import log_prediction, prediction_record
from cxrlt.monitoring.reference import reference_frame


def log_studies(path, tag, label_space, *, like_reference=None, seed=0, n=40):
    """Logged studies of `tag`: exactly the reference's predictions (`like_reference`, no drift by
    construction), else shifted predictions (beta(5, 2) against the reference's beta(2, 5): every column)."""
    rng = np.random.default_rng(seed)
    rows = (like_reference.to_dict("records") if like_reference is not None else
            [{f"p_{k}": float(v) for k, v in zip(label_space.names, rng.beta(5, 2, len(label_space)))}
             for _ in range(n)])
    for r in rows:
        probs = {k[2:]: v for k, v in r.items() if k.startswith("p_")}
        log_prediction(prediction_record(model_tag=tag, probabilities=probs, views=["frontal"],
                                                 image_stats=[]), path)
    return path


def run_flow(**params):
    from pipelines.drift import drift_report

    state = drift_report(**params, return_state=True)
    return state.result(), state.state_details.flow_run_id


def artifacts_of(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def drift_events(tag: str, want: int, timeout: float = 30.0) -> list:
    """The server's cxrlt.drift.detected events of `tag`, once there are `want` of them (events reach the
    server asynchronously) or the timeout passed."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from pipelines.drift import DRIFT_EVENT

    flt = EventFilter(event=EventNameFilter(name=[DRIFT_EVENT]), resource=EventResourceFilter(id=[f"cxrlt.model.{tag}"]))
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=flt, limit=50).events
        if len(events) >= want or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_flow_publishes_and_signals_only_over_the_threshold(prefect_harness, serving, tiny_artefact, label_space,
                                                           tmp_path):
    tag = serving
    same = log_studies(tmp_path / "same.jsonl", tag, label_space, like_reference=reference_frame(tiny_artefact))
    calm, calm_run = run_flow(log_path=str(same), out_dir=str(tmp_path / "calm"), tag=tag, threshold=0.3,
                              db=f"sqlite:///{tmp_path / 'same.db'}")  # the log is imported into that store
    assert calm["share_drifted"] == 0.0 and calm["drift_detected"] is False
    assert calm["input"]["n_columns"] == 0 and "image_stats_val.csv" in calm["notes"][0]  # an older artefact

    shifted = log_studies(tmp_path / "shifted.jsonl", tag, label_space, seed=1)
    hot, hot_run = run_flow(log_path=str(shifted), out_dir=str(tmp_path / "hot"), tag=tag, threshold=0.3,
                            db=f"sqlite:///{tmp_path / 'shifted.db'}")
    assert hot["share_drifted"] == 1.0 and hot["drift_detected"] is True
    assert (tmp_path / "hot" / hot["run"] / "drift.html").exists() and len(drift_history(tmp_path / "hot")) == 1

    arts = artifacts_of(hot_run)
    assert {"drift-summary", "drift-report", "drift-columns"} <= set(arts)
    md = arts["drift-summary"].data
    assert f"Drift of {tag}" in md and "| prediction | 6 of 6 (100%)" in md and "| input | not measured" in md
    link = (tmp_path / "hot" / hot["run"] / "drift.html").resolve().as_uri()  # a link artifact is markdown
    assert arts["drift-report"].data == f"[drift report {hot['run']}]({link})"
    table = arts["drift-columns"].data
    assert f"p_{label_space.names[0]}" in str(table) and arts["drift-columns"].type == "table"
    assert "| prediction | 0 of 6 (0%) | none |" in artifacts_of(calm_run)["drift-summary"].data

    events = drift_events(tag, want=1)
    assert len(events) == 1, "one event: the shifted run, not the calm one"
    ev = events[0]
    assert ev.resource.id == f"cxrlt.model.{tag}" and ev.payload["run"] == hot["run"]
    assert str(tmp_path / "hot") in ev.payload["report"] and ev.payload["prediction"]["n_drifted"] == 6
    assert ev.payload["share_drifted"] == 1.0 and ev.payload["threshold"] == 0.3

    with pytest.raises(ValueError, match="share of columns"):
        run_flow(log_path=str(shifted), out_dir=str(tmp_path / "bad"), tag=tag, threshold=30)


def test_retrain_automation_is_created_once_and_reads_back(prefect_harness):
    from prefect import get_client

    from pipelines.automations import ensure_drift_automation
    from pipelines.drift import DRIFT_EVENT

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("train-eval")
        dep_id = client.create_deployment(flow_id, name="drift-test")
    auto = ensure_drift_automation("train-eval/drift-test", name="cxrlt-test-retrain", parameters={"epochs": 1})
    again = ensure_drift_automation("train-eval/drift-test", name="cxrlt-test-retrain", model_tag="cxrlt:abc")
    with get_client(sync_client=True) as client:
        stored = client.read_automations_by_name("cxrlt-test-retrain")
    assert len(stored) == 1 and stored[0].id == auto.id == again.id  # updated in place, not added
    trig, (action,) = stored[0].trigger, stored[0].actions
    assert trig.type == "event" and trig.expect == {DRIFT_EVENT} and trig.posture == "Reactive"
    assert trig.match.root["prefect.resource.id"] == "cxrlt.model.cxrlt:abc"  # the second call's filter
    assert action.type == "run-deployment" and action.deployment_id == dep_id and action.parameters is None
    assert auto.trigger.match.root["prefect.resource.id"] == "cxrlt.model.*" and auto.actions[0].parameters == {
        "epochs": 1}
    with pytest.raises(ValueError, match="no deployment 'train-eval/missing'"):
        ensure_drift_automation("train-eval/missing", name="cxrlt-test-retrain")
