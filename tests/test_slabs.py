"""ich.slabs, and thin series scored on ~5 mm slabs by ich.inference.Predictor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from ich import dicom
from ich.dicom.series import sort_series
from ich.inference import Predictor, study_score
from ich.labels import CLASSES
from ich.slabs import SLAB_MM, slab_means, slab_of_slice
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import make_checkpoint


def sizes(slab: np.ndarray | None) -> list[int]:
    assert slab is not None
    assert np.all(np.diff(slab) >= 0) and slab[0] == 0 and np.all(np.diff(slab) <= 1)  # contiguous, numbered in order
    return np.bincount(slab).tolist()


def test_0625_mm_slices_make_slabs_of_8():
    locations = -87.3 + 0.625 * np.arange(48)  # off-grid origin: rounding must not move a slice
    slab = slab_of_slice(locations, 0.625)
    assert sizes(slab) == [8] * 6
    np.testing.assert_array_equal(slab, np.repeat(np.arange(6), 8))


@pytest.mark.parametrize("spacing", [None, 0.0, 2.5, 5.0])
def test_thick_or_unplaced_series_are_not_slabbed(spacing):
    assert slab_of_slice(np.arange(10) * (spacing or 1.0), spacing) is None


def test_just_under_thin_mm_is_slabbed():
    assert sizes(slab_of_slice(2.4 * np.arange(6), 2.4)) == [2, 2, 2]


def test_short_tail_merges_into_the_slab_before_but_half_a_slab_stays():
    assert sizes(slab_of_slice(0.625 * np.arange(27), 0.625)) == [8, 8, 11]  # tail of 1.9 mm merged
    assert sizes(slab_of_slice(0.625 * np.arange(28), 0.625)) == [8, 8, 8, 4]  # 2.5 mm: a slab of its own


def test_gaps():
    # A missing slice leaves its slab one short; the next slab stays on the 5 mm grid.
    missing = np.delete(0.625 * np.arange(24), 10)
    assert sizes(slab_of_slice(missing, 0.625)) == [8, 7, 8]
    # A wide gap starts a new slab at the first slice after it...
    slab = slab_of_slice(np.concatenate([0.625 * np.arange(16), 30 + 0.625 * np.arange(16)]), 0.625)
    assert sizes(slab) == [8, 8, 8, 8] and slab is not None and slab[16] == 2
    # ...and a short tail beyond one is not averaged with slices 20 mm away.
    assert sizes(slab_of_slice(np.concatenate([0.625 * np.arange(16), [30, 30.625]]), 0.625)) == [8, 8, 2]


@pytest.mark.parametrize("spacing", [0.5, 0.6181, 0.625, 0.9, 1.0, 1.25, 2.0])
def test_every_slab_is_about_5_mm(spacing):
    locations = 12.7 + spacing * np.arange(int(97 / spacing))
    slab = slab_of_slice(locations, spacing)
    assert slab is not None and len(slab) == len(locations)
    span = np.array([np.ptp(locations[slab == k]) + spacing for k in range(slab.max() + 1)])
    assert np.all(span[:-1] <= SLAB_MM + spacing / 2) and np.all(span[:-1] > SLAB_MM - spacing)
    assert SLAB_MM / 2 <= span[-1] < 1.5 * SLAB_MM


def test_slab_means_are_the_mean_hu_of_each_slab():
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 500, (11, 5, 7)).astype(np.float32)
    slab = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    means = slab_means(volume, slab)
    assert means.dtype == np.float32 and means.shape == (3, 5, 7)
    for k, (a, b) in enumerate([(0, 3), (3, 8), (8, 11)]):
        np.testing.assert_allclose(means[k], volume[a:b].astype(np.float64).mean(0), rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(slab_means(list(volume), slab), means)  # the slices' own arrays, unstacked


def test_real_thin_series_makes_30_slabs(shared_data):
    """CQ500-CT-0: 238 slices 0.618 mm apart, with one slice missing near the end (headers only)."""
    slices = [dicom.read_slice(p, pixels=False) for p in sorted((shared_data / "cq500" / "CQ500-CT-0").glob("*.dcm"))]
    series = sort_series(slices[0].study_uid, slices[0].series_uid, slices)
    assert len(series) == 238 and series.spacing == pytest.approx(0.618, abs=1e-3)
    assert sizes(slab_of_slice(np.array([s.location for s in series.slices], float), series.spacing)) == [8] * 29 + [6]


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def series_at(step: float, n: int) -> dicom.Series:
    return dicom.load(series_uploads(step, n)).series[0]


def series_uploads(step: float, n: int) -> list[dicom.Upload]:
    """``n`` slices ``step`` mm apart; the disc's HU rises along the series, so each slab looks different."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 120
    study, uid = generate_uid(), generate_uid()
    return [
        dicom.Upload(
            f"{i}.dcm",
            to_bytes(
                make_ct(
                    np.where(disc, 5.0 * i, -1000.0) + rng.normal(0, 30, disc.shape),
                    z=step * i,
                    series_uid=uid,
                    study_uid=study,
                    instance=i + 1,
                )
            ),
        )
        for i in range(n)
    ]


def test_thin_series_is_scored_on_its_slabs(predictor):
    series = series_at(0.625, 24)
    slab = np.repeat(np.arange(3), 8)
    result = predictor.predict_series(series)
    assert result.probs.shape == (24, 6) and result.sop_uids == series.sop_uids and len(set(result.slab_of_slice)) == 3
    # Each thin slice carries exactly its slab mean's probabilities...
    expected, _ = predictor.predict_volume(slab_means(series.volume(), slab))
    np.testing.assert_array_equal(result.probs, expected[slab])
    assert len(np.unique(expected[:, 0])) == 3
    # ...which are not what the thin slices themselves score.
    per_slice, _ = predictor.predict_volume(series.volume())
    assert not np.allclose(result.probs, per_slice)
    # Scored over the 3 slabs: top-2 of the 24 repeated rows would be the top slab twice.
    assert result.score == pytest.approx(study_score(expected[:, 0], predictor.top_k), abs=1e-7)
    assert result.score != pytest.approx(study_score(result.probs[:, 0], predictor.top_k), abs=1e-7)
    assert result.flagged == (result.score >= predictor.thresholds["any"])
    note = "thin series (0.6 mm): scored on 3 slabs of ~5 mm"
    assert note in series.notes
    predictor.predict_series(series)
    assert series.notes.count(note) == 1


def test_5_mm_series_is_scored_per_slice_as_before(predictor):
    series = series_at(5.0, 6)
    notes = list(series.notes)
    result = predictor.predict_series(series)
    before, _ = predictor.predict_volume([s.pixels for s in series.slices])
    np.testing.assert_array_equal(result.probs, before)
    assert len(np.unique(before[:, 0])) == 6
    assert result.score == study_score(before[:, 0], predictor.top_k)
    assert result.slab_of_slice is None and series.notes == notes


def test_study_score_counts_each_slab_once(tmp_path):
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "k3", study_top_k=3), device="cpu")
    slab = np.repeat(np.arange(4), [8, 8, 8, 6])
    probs = np.full((len(slab), 6), 0.05, np.float32)
    probs[:, 0] = np.array([0.9, 0.6, 0.3, 0.1], np.float32)[slab]
    result = predictor.summarize([str(i) for i in range(len(slab))], probs, slab_of_slice=slab)
    assert result.score == pytest.approx(0.6)  # (0.9 + 0.6 + 0.3) / 3, not 0.9
    assert predictor.summarize([str(i) for i in range(len(slab))], probs).score == pytest.approx(0.9)


def test_evaluate_scores_a_thin_series_as_the_worklist_does(predictor, tmp_path):
    """``ich evaluate``'s series score counts each slab once, as Predictor.predict_series does."""
    from ich import evaluate

    uploads = series_uploads(0.625, 24)
    worklist_score = predictor.predict_series(dicom.load(uploads).series[0]).score
    folder = tmp_path / "thin"
    folder.mkdir()
    for u in uploads:
        (folder / u.name).write_bytes(u.data)
    result = evaluate.predict(predictor, [folder], progress=False)
    assert sorted(set(result.frame["slab"])) == [0, 1, 2]
    labels = pd.DataFrame(0.0, index=result.frame.index, columns=list(CLASSES))
    labels.iloc[:8, 0] = 1.0
    report = evaluate.evaluate(result.frame, labels, predictor.thresholds, predictor.top_k)
    (row,) = report["series_scores"]
    assert row["score"] == pytest.approx(worklist_score, abs=1e-6) and row["slices"] == 24
