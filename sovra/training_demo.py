"""A synthetic hospital dataset for the training demo and tests (no real person in it).

scikit-learn's bundled Wisconsin breast cancer data (569 patients, 30 numeric features, target
malignant/benign) joined with generated patient names, valid-checksum Chinese resident ID numbers
(random region, birth date and sequence; the check character is computed, so the edge's detector
recognises them), a medical record number, and a special-category column (a genetic test
result) that the example policy drops. A canary value can be planted in one row.
"""

from __future__ import annotations

import csv
import random
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

from sovra._detector_validators import cn_resident_id_check_char

SURNAMES: Final = ("Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou")
GIVEN: Final = ("Wei", "Fang", "Na", "Min", "Jing", "Qiang", "Lei", "Jun", "Yan", "Tao", "Hui")
REGIONS: Final = ("110105", "310104", "440305", "320106", "510107", "330106", "420111")
TARGET: Final = "diagnosis"
NAME_COLUMN: Final = "patient_name"
ID_COLUMN: Final = "resident_id"
GENETIC_COLUMN: Final = "brca_test"
LABELS: Final = f"{NAME_COLUMN}=confidential,{GENETIC_COLUMN}=restricted"


def resident_id(rng: random.Random) -> str:
    born = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 365 * 60))
    body = f"{rng.choice(REGIONS)}{born:%Y%m%d}{rng.randrange(0, 1000):03d}"
    return body + cn_resident_id_check_char(body)


def hospital_rows(seed: int = 7, canary: str = "") -> tuple[list[str], list[list[Any]]]:
    """Column names and rows; ``canary`` (if given) replaces the name and the MRN in row 0."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = random.Random(seed)
    features = [str(n).replace(" ", "_") for n in data.feature_names]
    columns = [NAME_COLUMN, ID_COLUMN, "mrn", *features, GENETIC_COLUMN, TARGET]
    rows: list[list[Any]] = []
    for i, (x, y) in enumerate(zip(data.data, data.target, strict=True)):
        name = f"{rng.choice(SURNAMES)} {rng.choice(GIVEN)}"
        mrn = f"MRN-{300000 + i:06d}"
        if i == 0 and canary:
            name = mrn = canary
        rows.append(
            [
                name,
                resident_id(rng),
                mrn,
                *[round(float(v), 6) for v in x],
                rng.choice(("negative", "negative", "negative", "BRCA1+", "BRCA2+")),
                "benign" if int(y) == 1 else "malignant",
            ]
        )
    return columns, rows


def write_hospital_csv(
    path: Path, seed: int = 7, canary: str = "", holdout: int = 0
) -> list[dict[str, Any]]:
    """Write the dataset to ``path`` (minus the last ``holdout`` rows); return those held-out
    rows as records (for scoring "new" patients)."""
    columns, rows = hospital_rows(seed, canary)
    kept, new = (rows[:-holdout], rows[-holdout:]) if holdout else (rows, [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(kept)
    return [dict(zip(columns, row, strict=True)) for row in new]
