"""Label vocabularies of the other public data sets (NIH ChestX-ray14, PadChest), as data.

A label space is matched BY NAME across data sets, so a finding that two data sets share must carry one
name. The project's names are the CXR-LT ones (`cxrlt.labels`); NIH's own names are mapped onto them
here, in one table, and PadChest's free-text findings are case-normalised and spelled the project's way
wherever they are the same finding. The counts are the published/real ones of the full label files (the
files that ship in the `torchxrayvision` wheel), for reference tables and tests, never for training.
"""

from __future__ import annotations

import re

from cxrlt.labels import LABELS_2023, TASK1_LABELS, TASK3_LABELS

# NIH ChestX-ray14 (Data_Entry_2017_v2020.csv): its 14 findings + "No Finding" -> the project's names.
# Effusion and Pleural_Thickening are the CXR-LT findings of the same meaning; "No Finding" keeps the
# CXR-LT 2023 name (positive when none of the 14 is present; NIH never lists it with a finding).
NIH_NAME_MAP: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Effusion": "Pleural Effusion", "Emphysema": "Emphysema", "Fibrosis": "Fibrosis",
    "Hernia": "Hernia", "Infiltration": "Infiltration", "Mass": "Mass", "No Finding": "No Finding",
    "Nodule": "Nodule", "Pleural_Thickening": "Pleural Thickening", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NIH_LABELS: tuple[str, ...] = tuple(sorted(NIH_NAME_MAP.values()))
NIH_NO_FINDING = "No Finding"
# Images per label in the full release (112,120 images of 30,805 patients), by the project's names.
NIH_COUNTS: dict[str, int] = {
    "No Finding": 60361, "Infiltration": 19894, "Pleural Effusion": 13317, "Atelectasis": 11559,
    "Nodule": 6331, "Mass": 5782, "Pneumothorax": 5302, "Consolidation": 4667, "Pleural Thickening": 3385,
    "Cardiomegaly": 2776, "Emphysema": 2516, "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227,
}
NIH_N_IMAGES, NIH_N_PATIENTS = 112_120, 30_805

# PadChest (PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv): 160,861 images of 67,625 patients.
# Its label lists hold 193 distinct non-empty findings; 3,041 lists also hold an empty string '' (counted
# as a 194th "finding" when the raw strings are counted), which is not a finding and is dropped here.
PADCHEST_N_IMAGES, PADCHEST_N_PATIENTS, PADCHEST_N_FINDINGS = 160_861, 67_625, 193
PADCHEST_TOP: dict[str, int] = {"Normal": 50616, "copd signs": 23280, "Cardiomegaly": 15022}
# Tags PadChest lists among its labels that describe the study or the report, not the chest: the image was
# excluded, the study is suboptimal, the image is unchanged from a prior one. Kept out of the label space;
# an image whose list holds nothing else states no finding, so its labels are unknown.
PADCHEST_NOT_FINDINGS = frozenset({"exclude", "suboptimal study", "unchanged"})

# Every name the project uses; a PadChest finding equal to one of them (ignoring case) takes its spelling.
PROJECT_NAMES: dict[str, str] = {n.lower(): n for n in (*TASK1_LABELS, *LABELS_2023, *TASK3_LABELS, *NIH_LABELS)}
_SPACES = re.compile(r"\s+")


def canonical_finding(name: str) -> str:
    """A free-text finding as a label name: stripped, inner spaces collapsed, lower case, except that a
    finding the project already names ('pleural effusion', 'normal', 'scoliosis') takes the project's
    spelling ('Pleural Effusion', 'Normal', 'Scoliosis'). '' stays '' (the caller drops it)."""
    low = _SPACES.sub(" ", str(name)).strip().lower()
    return PROJECT_NAMES.get(low, low)
