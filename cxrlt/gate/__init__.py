"""The input gate: refuse, with a reason, what is not an adult chest radiograph.

Two parts, both JSON-able through `GateResult.as_dict()` / `GateCheck.as_dict()`:

  check_image(info, image)      rules that need no model (`rules.py`): DICOM Modality and BodyPartExamined,
                                size, aspect ratio, colour, flatness; `info` is a `cxrlt.data.images.ImageInfo`
  Predictor.gate_images(images) the out-of-distribution score on the model's own features (`ood.py`), against
                                the threshold stored with the model (eval/gate.json, fitted by `cxrlt evaluate`
                                or `cxrlt gate`); a model without one answers a check that did not run.
                                `Predictor.predict_gated` takes the features from the prediction's own pass

`synthetic.py` draws non-chest inputs (photographs, noise, flat, knee, hand) to measure the gate with.
"""

from cxrlt.gate.calibrate import calibrate, calibrate_artefact, load_gate, remove_gate
from cxrlt.gate.ood import GateError, OODGate, fit_gate
from cxrlt.gate.rules import (GateCheck, GateResult, check_body_part, check_geometry, check_image, check_metadata,
                              check_modality, check_pixels)

__all__ = ["GateCheck", "GateError", "GateResult", "OODGate", "calibrate", "calibrate_artefact", "check_body_part",
           "check_geometry", "check_image", "check_metadata", "check_modality", "check_pixels", "fit_gate",
           "load_gate", "remove_gate"]
