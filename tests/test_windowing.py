from __future__ import annotations

import numpy as np
import pytest

from ich import windowing as w


def test_presets_are_the_clinical_ones():
    assert (w.BRAIN.level, w.BRAIN.width) == (40, 80)
    assert (w.SUBDURAL.level, w.SUBDURAL.width) == (80, 200)
    assert (w.BONE.level, w.BONE.width) == (600, 2800)
    assert set(w.PRESETS) >= {"brain", "subdural", "bone", "stroke", "soft tissue"}
    assert w.MODEL_WINDOWS == (w.BRAIN, w.SUBDURAL, w.BONE)


def test_apply_window_float_and_uint8():
    hu = np.array([-1000, 0, 40, 80, 2000], dtype=np.float32)
    np.testing.assert_allclose(w.apply_window(hu, w.BRAIN), [0, 0, 0.5, 1, 1])
    assert w.apply_window(hu, w.BRAIN, np.uint8).tolist() == [0, 0, 128, 255, 255]


def test_stack_windows_channels():
    hu = np.full((4, 4), 80.0, dtype=np.float32)
    out = w.stack_windows(hu)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 128, round(255 * (80 + 800) / 2800)]


def disc(size=128, radius=40, inside=30.0, centre=None):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = centre or (size // 2, size // 2)
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2, inside, -1000.0).astype(np.float32)


def test_brain_fraction_and_threshold():
    full = disc(radius=60)
    empty = np.full((128, 128), -1000.0, np.float32)
    assert w.brain_fraction(full) == pytest.approx(np.pi * 60**2 / 128**2, rel=0.08)
    assert w.brain_fraction(empty) == 0.0
    assert w.brain_fraction(disc(radius=10)) < w.BRAIN_FRACTION_THRESHOLD < w.brain_fraction(full)
    bone = disc(radius=60, inside=1500.0)
    # Bone is saturated in the brain window: only the blurred rim at its edge counts.
    assert w.brain_fraction(bone) < 0.2 * w.brain_fraction(full)


def test_head_bbox_ignores_table():
    hu = disc(size=256, radius=50, centre=(100, 128))
    hu[230:236, 20:236] = 200.0  # the patient table, separate from the head
    box = np.array(w.head_bbox(hu))
    # Exact box (51, 150, 79, 178) to within the 4-pixel labelling grid.
    assert np.abs(box - [51, 150, 79, 178]).max() <= 4
    assert np.abs(np.array(w.head_bbox(hu, step=1)) - [51, 150, 79, 178]).max() <= 1
    assert w.head_bbox(np.full((64, 64), -1000.0)) is None


def test_preprocess_crops_resizes_and_stacks():
    hu = disc(size=512, radius=100, centre=(200, 300))
    out = w.Preprocess(size=256)(hu)
    assert out.shape == (3, 256, 256) and out.dtype == np.uint8
    # The head fills the output after cropping: the brain channel is mostly lit.
    assert (out[0] > 0).mean() > 0.6
    uncropped = w.Preprocess(size=256, crop=False)(hu)
    assert (uncropped[0] > 0).mean() < 0.2


def test_crop_pads_at_image_edge():
    hu = disc(size=128, radius=30, centre=(20, 64))  # head touching the top edge
    out = w.CropHead()(hu)
    assert out.shape[0] == out.shape[1]
    assert (out > 0).sum() == (hu > 0).sum()  # nothing of the head cut off


def test_brain_input_is_the_same_from_hu_and_from_its_brain_window_png(shared_data):
    """The model sees one thing whether a slice comes as DICOM HU or as the 8-bit brain-window PNG of it."""
    from ich import dicom

    spec = w.BRAIN_INPUT
    preprocess = w.Preprocess.from_spec(spec, 128)
    files = sorted((shared_data / "rsna-sample" / "stage_2_train").glob("*.dcm"))[::40]
    for path in files:
        hu = dicom.read_slice(path).hu
        png = w.apply_window(hu, w.BRAIN, np.uint8)  # what rsna-png holds (at full size)
        from_hu, from_png = preprocess(hu), preprocess(w.window_to_hu(png))
        assert from_hu.shape == (3, 128, 128) and (from_hu[0] == from_hu[1]).all()
        diff = np.abs(from_hu.astype(int) - from_png.astype(int))
        assert diff.max() <= 1, path.name  # rounding of the 8-bit PNG, nothing more


def test_brain_input_ignores_what_lies_outside_the_window():
    hu = disc(size=256, radius=60, inside=30.0)
    bone = hu.copy()
    bone[bone < -500] = -3000.0  # another scanner's padding value
    bone[100:110, 100:110] = 1500.0
    clipped = hu.copy()
    clipped[100:110, 100:110] = 80.0  # the same pixels, as a brain-window image saturates them
    preprocess = w.Preprocess.from_spec(w.BRAIN_INPUT, 64)
    np.testing.assert_array_equal(preprocess(bone), preprocess(clipped))
    assert w.INPUTS["three-window"].windows == w.MODEL_WINDOWS and not w.INPUTS["three-window"].clip


def test_window_to_hu_inverts_apply_window():
    levels = np.arange(256, dtype=np.uint8)
    assert (w.apply_window(w.window_to_hu(levels), w.BRAIN, np.uint8) == levels).all()
