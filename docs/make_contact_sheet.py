"""Render ``docs/contact_sheet.png``: phantom slices beside real RSNA slices, brain window.

Rows of the first block are anatomical levels (skull base to vertex), found at the same
fraction of the head's extent in every series: three phantom studies, then two real series. The
second block shows one slice of each hemorrhage subtype, phantom above real (the real epidural
comes from ``rsna-5-samples``; the RSNA sample has none). Every tile is cropped to the head.

    .venv/bin/python docs/make_contact_sheet.py [--out docs/contact_sheet.png]

Needs the real data beside the project (``../shared/data``); only this small figure is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ich import dicom, phantom  # noqa: E402
from ich.labels import SUBTYPES, read_rsna_csv  # noqa: E402
from ich.windowing import BRAIN, CropHead, Resize, apply_window  # noqa: E402

REAL = ROOT.parent / "shared" / "data"
RSNA = REAL / "rsna-sample"
REAL_EPIDURAL = REAL / "rsna-5-samples" / "Samples" / "ID_2008dd408_epidural_subarachnoid_subdural.dcm"
LEVELS = {"skull base": 0.1, "post. fossa": 0.25, "ventricles": 0.58, "convexity": 0.75, "vertex": 0.92}
PHANTOM_SEEDS = (1, 4, 9)
REAL_NORMAL_SERIES = ("ID_02033fb12e", "ID_3780d48b28")  # two series without hemorrhage
BLEED_SEEDS = dict(zip(SUBTYPES, (23, 11, 15, 16, 13)))  # chosen to show each subtype clearly
TILE = 224


def real_series() -> dict[str, tuple[np.ndarray, list[str]]]:
    """Series UID -> (HU volume sorted along the slice normal, SOP UIDs), read by :mod:`ich.dicom`
    (so the RSNA wrapped-pixel fix applies)."""
    return {s.series_uid: (s.volume(), s.sop_uids) for s in dicom.load(RSNA / "stage_2_train").series}


def level_index(volume: np.ndarray, fraction: float) -> int:
    """Slice at ``fraction`` of the way from the lowest to the highest slice with much head in it."""
    area = (volume > -500).reshape(len(volume), -1).sum(axis=1)
    rows = np.flatnonzero(area > 0.25 * area.max())
    return int(rows[0] + round(fraction * (rows[-1] - rows[0])))


def _pure_rows(frame, subtype: str) -> np.ndarray:
    """Slices positive for ``subtype`` with the fewest other subtypes."""
    others = frame[[c for c in SUBTYPES if c != subtype]].sum(axis=1).to_numpy()
    positive = frame[subtype].to_numpy() == 1
    return positive & (others == others[positive].min()) if positive.any() else positive


def middle_positive(flags: np.ndarray) -> int:
    rows = np.flatnonzero(flags)
    return int(rows[len(rows) // 2])


def tile(hu: np.ndarray, caption: str) -> np.ndarray:
    img = Resize(TILE)(CropHead(margin=6)(hu))
    img = apply_window(img, BRAIN, np.uint8)
    cv2.rectangle(img, (0, 0), (TILE, 17), 0, -1)
    cv2.putText(img, caption, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, 255, 1, cv2.LINE_AA)
    return img


def main() -> None:
    dicom.quiet_invalid_values()  # an entry point: RSNA's invalid UIDs are expected
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "contact_sheet.png")
    args = parser.parse_args()

    real = real_series()
    labels = read_rsna_csv(RSNA / "stage_2_train.csv")
    normals = [phantom.generate_study(s, hemorrhage=False) for s in PHANTOM_SEEDS]
    rows = []
    for name, fraction in LEVELS.items():
        row = [tile(st.hu[level_index(st.hu, fraction)], f"phantom {st.seed}: {name}") for st in normals]
        for uid in REAL_NORMAL_SERIES:
            volume, _ = real[uid]
            row.append(tile(volume[level_index(volume, fraction)], f"RSNA: {name}"))
        rows.append(np.hstack(row))

    fake, true = [], []
    for subtype in SUBTYPES:
        st = phantom.generate_study(BLEED_SEEDS[subtype], subtypes=[subtype])
        area = ((st.masks >> SUBTYPES.index(subtype)) & 1).reshape(len(st), -1).sum(axis=1)
        fake.append(tile(st.hu[int(area.argmax())], f"phantom: {subtype}"))
        if subtype == "epidural":
            hu = dicom.read_slice(REAL_EPIDURAL).pixels
        else:  # the series with most slices of this subtype: its slice with the fewest other subtypes
            volume, sops = max(real.values(), key=lambda v: labels.loc[v[1], subtype].sum())
            hu = volume[middle_positive(_pure_rows(labels.loc[sops], subtype))]
        true.append(tile(hu, f"RSNA: {subtype}"))
    gap = np.zeros((12, TILE * len(SUBTYPES)), np.uint8)
    sheet = np.vstack([*rows, gap, np.hstack(fake), np.hstack(true)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]}, {args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
