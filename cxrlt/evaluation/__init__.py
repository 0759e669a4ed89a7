"""How a model is scored and compared: `metrics` (per-label and macro, groups, thresholds, calibration),
`bootstrap` (intervals over resampled patients), `simulation` (populations with known metric values, for
coverage checks), and the comparison `report` with its `runs` (artefacts as runs, seeds pooled) and `plots`."""
