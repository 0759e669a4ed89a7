"""The view vocabulary every layer shares: a view's name and code as models see it, and the DICOM
ViewPosition codes that route an image to the frontal or the lateral side.

Training (the manifest), the DICOM reader, the models' view-specific parts, the gate and the service all
read these names, so a view is routed the same way wherever it is met.
"""

from __future__ import annotations

# The code a model receives per view slot (`view_types`): 0 frontal, 1 lateral, 2 unknown.
VIEW_CODES = {"frontal": 0, "lateral": 1, "unknown": 2}
UNKNOWN_VIEW = VIEW_CODES["unknown"]

# ViewPosition codes as training routes them (`cxrlt.data.manifest.view_type`, MIMIC-CXR's values);
# decubitus films (LLD / RLD) are frontal projections taken lying on one side.
FRONTAL_POSITIONS = frozenset({"PA", "AP", "AP AXIAL", "PA AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD",
                               "LLD", "RLD", "LAO", "RAO", "LPO", "RPO"})
LATERAL_POSITIONS = frozenset({"LATERAL", "LL", "RL", "LAT", "XTABLE LATERAL", "SWIMMERS"})
