"""What `calibrate` decides on (runtime.agreement.Criteria, docs/design.md "Precision policy"): each criterion's
arithmetic on hand-made outputs whose verdict is worked out by hand here, so no figure depends on a CPU's INT8
kernels or on trained weights. Each test is built so that a plausible wrong computation (a majority vote for the
study grade, the studies pooled, IoU over every frame, the floor from the wrong pair of runs, a gap of exactly 0.1
counted as a tie, the accuracy of the other run's frames) gives another answer."""
import numpy as np
import pytest

from runtime.agreement import (CLEAR_GAP, Criteria, Outputs, Reference, against, compare, describe, study_grade,
                               with_noise)

NAN2 = [np.nan, np.nan]


def _out(probs, accepted=None, masks=None) -> Outputs:
    """Outputs of N frames with 2 classes: probabilities per frame (NaN rows where rejected), features that are the
    probabilities themselves, masks of 4x4 (all kidney unless given)."""
    probs = np.array(probs, float)
    n = len(probs)
    accepted = np.isfinite(probs[:, 0]) if accepted is None else np.array(accepted, bool)
    masks = np.ones((n, 4, 4), bool) if masks is None else np.array(masks, bool)
    return Outputs(masks, masks.reshape(n, -1).mean(1), accepted, probs.astype(np.float32), probs)


def _row(rows, name):
    return next(r for r in rows if r["criterion"] == name)


# -- study grade ---------------------------------------------------------------------------------------------------

def test_the_study_grade_is_the_argmax_of_the_mean_probabilities_over_accepted_frames():
    """Per frame the grades are 1, 2, 2 (a majority vote says 2); the mean of the accepted frames' probabilities is
    (0.95 + 0.45 + 0.45) / 3 = 0.617 for grade 1: the study summary's grade is 1. The rejected frame (its
    probabilities would make it 2) does not count."""
    out = _out([[0.95, 0.05], [0.45, 0.55], [0.45, 0.55], [0.0, 1.0]], accepted=[True, True, True, False])
    assert study_grade(out, range(4), 2) == 1
    assert study_grade(out, [1, 2], 2) == 2
    assert study_grade(out, [3], 2) is None                # no accepted frame: no grade

    # the same as the runtime's own study summary computes from those records
    from runtime.record import FrameRecord
    from runtime.sinks.summary import StudySummary
    s = StudySummary(n_classes=2)
    for i in range(4):
        acc = bool(out.accepted[i])
        s.write(FrameRecord(frame=i, source_id="x", t_capture=0.0, accepted=acc,
                            probabilities=list(out.probabilities[i]) if acc else None))
    assert s.summary()["final_grade"] == 1


def test_study_grades_are_compared_study_by_study():
    """Two patients of two frames. FP32: patient a mean (0.7, 0.3) -> 1; b mean (0.3, 0.7) -> 2. The other run
    moves b to (0.6, 0.4) -> 1 and leaves a alone: one study of two differs (0.5), although pooled over the set
    both runs give grade 1 (a set-wide study grade would see no difference) and the per-frame grades differ on 2
    frames of 4."""
    ref = _out([[0.8, 0.2], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6]])
    other = _out([[0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    m = against(Reference(ref, 2, studies=["a", "a", "b", "b"]), other)
    assert m["studies"] == 2 and m["study_agreement"] == 0.5 and m["studies_differing_count"] == 1
    assert m["studies_differing"] == [{"study": 2, "frames": 2, "reference": 2, "grade": 1}]   # a number, no id
    row = _row(Criteria().judge(m), "study grade")
    assert (row["figure"], row["limit"], row["margin"], row["passed"]) == (0.5, 1.0, -0.5, False)
    assert "differs from FP32's in 1 of 2 studies" in describe(row, m)
    assert _row(Criteria(min_study=0.5).judge(m), "study grade")["passed"]
    assert not [r for r in Criteria(min_study=0).judge(m) if r["criterion"] == "study grade"]     # off
    # the same frames as one study (a source without patients): the pooled grades agree
    one = against(Reference(ref, 2), other)
    assert one["studies"] == 1 and one["study_agreement"] == 1.0


def test_a_study_the_other_run_no_longer_grades_differs():
    ref = _out([[0.8, 0.2], [0.3, 0.7]])
    other = _out([[0.8, 0.2], NAN2])                       # the gate now rejects patient b's only frame
    m = against(Reference(ref, 2, studies=["a", "b"]), other)
    assert m["studies_differing"] == [{"study": 2, "frames": 1, "reference": 2, "grade": None}]


# -- per-frame grade agreement against FP32's noise floor ----------------------------------------------------------

def test_grade_agreement_is_judged_against_fp32s_agreement_with_itself_under_noise():
    """Five frames all accepted. FP32 under noise swaps frame 4 (0.52/0.48 -> 0.48/0.52) and rejects frame 3: the
    floor is 3 agreeing of the 4 frames both FP32 runs accept = 0.75. A precision swapping one frame of five agrees
    on 0.8 >= 0.75 (margin 0.05); one swapping two agrees on 0.6 (short by 0.15). The floor is FP32 clean against
    FP32 with noise, not the precision against either: computed otherwise it would not be 0.75."""
    clean = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.52, 0.48]]
    noisy = _out([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], NAN2, [0.48, 0.52]])
    ref = Reference(_out(clean), 2, noisy=noisy, noise_levels=1)
    assert ref.figures["grade_floor"] == 0.75 and ref.figures["grade_floor_frames"] == 4
    one = _out([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.52, 0.48]])
    two = _out([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.4, 0.6], [0.52, 0.48]])
    for other, agreement, margin in ((one, 0.8, 0.05), (two, 0.6, -0.15)):
        m = against(ref, other)
        row = _row(Criteria().judge(m), "grade agreement")
        assert m["grade_agreement"] == agreement and m["grade_floor"] == 0.75
        assert (row["figure"], row["limit"], row["margin"], row["passed"]) == (agreement, 0.75, margin, margin >= 0)
        assert "noise" in row["limit_is"]
    m = against(ref, two)
    assert "grade agreement 0.6000 < 0.7500" in describe(_row(Criteria().judge(m), "grade agreement"), m)
    # a fixed limit replaces the floor; 0 turns the check off; no noise run and no fixed limit: off too
    assert _row(Criteria(min_grade=0.5).judge(m), "grade agreement")["passed"]
    assert not [r for r in Criteria(min_grade=0).judge(m) if r["criterion"] == "grade agreement"]
    assert not [r for r in Criteria(grade_noise=0).judge(m) if r["criterion"] == "grade agreement"]


def test_without_the_noise_run_the_floor_is_not_measured_and_fails():
    m = against(Reference(_out([[0.9, 0.1]]), 2), _out([[0.9, 0.1]]))
    row = _row(Criteria().judge(m), "grade agreement")
    assert m["grade_floor"] is None and not row["passed"] and "not measured" in row["note"]


def test_the_near_tie_share_counts_fp32s_accepted_frames_whose_top_two_are_within_the_gap():
    """FP32 accepts four frames with top-two gaps 0.02, CLEAR_GAP exactly (not a near tie), 0.06 and 0.6, and
    rejects one: 2 near ties of 4 accepted frames (0.5; of all five frames it would be 0.4)."""
    ref = _out([[0.51, 0.49], [CLEAR_GAP, 0.0], [0.47, 0.53], [0.8, 0.2], NAN2])   # a gap of exactly CLEAR_GAP
    m = against(Reference(ref, 2), ref)
    assert m["near_tie_share"] == 0.5 and m["frames_near_tie"] == 2


def test_noise_is_seeded_integer_and_clipped_within_the_levels():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3)]
    images[0][:] = 0
    images[1][:] = 255
    a, b = with_noise(images, 1), with_noise(images, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))                  # seeded: the same every run
    assert not np.array_equal(with_noise(images, 1, seed=1)[2], a[2])
    d = a[2].astype(int) - images[2].astype(int)
    assert a[2].dtype == np.uint8 and set(np.unique(d)) == {-1, 0, 1}      # +-1 grey level, some pixels unchanged
    assert set(np.unique(a[0])) == {0, 1} and set(np.unique(a[1])) == {254, 255}   # clipped, not wrapped
    assert np.abs(with_noise(images, 3)[2].astype(int) - images[2]).max() == 3


# -- gate and mask IoU -------------------------------------------------------------------------------------------

def test_mask_iou_is_judged_on_the_frames_fp32s_gate_accepts():
    """Three frames. Frame 0 (accepted by both) IoU 8/12; frame 1 (accepted) IoU 1; frame 2: FP32 rejects it (a
    speck of 1 pixel) and the other run's mask there shares nothing with it (IoU 0). Over FP32's accepted frames the
    IoU is (8/12 + 1) / 2 = 0.8333; over every frame with kidney it would be 0.5556, reported beside it."""
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True
    masks[1, :1] = True
    masks[2, 0, 0] = True
    other = masks.copy()
    other[0, 2, :] = True
    other[2] = False
    other[2, 3, 3] = True
    ref = _out([[0.7, 0.3], [0.4, 0.6], NAN2], masks=masks)
    oth = _out([[0.7, 0.3], [0.4, 0.6], NAN2], masks=other)
    m = compare(ref, oth)
    assert m["mask_iou_accepted_mean"] == pytest.approx((8 / 12 + 1) / 2, abs=1e-6)
    assert m["mask_iou_mean"] == pytest.approx((8 / 12 + 1 + 0) / 3, abs=1e-6)
    assert m["frames_accepted_by_reference"] == 2 and m["gate_agreement"] == 1.0
    row = _row(Criteria().judge(m), "mask IoU (accepted frames)")
    assert row["figure"] == m["mask_iou_accepted_mean"] and row["limit"] == 0.98 and not row["passed"]
    assert row["margin"] == pytest.approx(0.833333 - 0.98, abs=1e-6)
    assert _row(Criteria(min_iou=0.8).judge(m), "mask IoU (accepted frames)")["passed"]   # 0.8 < 0.833 < 0.98


def test_gate_agreement_limit_is_098():
    """50 frames, one gate decision differs: 0.98 meets 0.98 (a figure equal to its limit passes); two: 0.96 does
    not."""
    probs = [[0.7, 0.3]] * 50
    ref = _out(probs)
    for flips, passed in ((1, True), (2, False)):
        acc = np.ones(50, bool)
        acc[:flips] = False
        m = compare(ref, _out(probs, accepted=acc))
        row = _row(Criteria().judge(m), "gate agreement")
        assert (row["figure"], row["passed"]) == (1 - flips / 50, passed)
        assert row["margin"] == pytest.approx(1 - flips / 50 - 0.98, abs=1e-9)


# -- accuracy against the labels -----------------------------------------------------------------------------------

def test_accuracy_may_drop_at_most_001_below_fp32s():
    """Labels 1, 1, 2, 2, 0 (unknown). FP32 grades 1, 1, 2, 1 and the unlabelled frame: 3 of the 4 labelled frames,
    0.75. The other run grades 1, 2, 2 and rejects frame 3: 2 right of the 3 labelled frames it accepts, 0.6667; a
    drop of 0.0833, short of the 0.01 limit by 0.0733."""
    ref = _out([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    other = _out([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], NAN2, [0.1, 0.9]])
    r = Reference(ref, 2, labels=np.array([1, 1, 2, 2, 0]))
    m = against(r, other)
    assert m["accuracy_reference"] == 0.75 and m["frames_labelled_reference"] == 4
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-6) and m["frames_labelled"] == 3
    row = _row(Criteria().judge(m), "accuracy drop")
    assert row["figure"] == pytest.approx(0.75 - 2 / 3, abs=1e-6) and row["limit"] == 0.01 and not row["passed"]
    assert row["margin"] == pytest.approx(0.01 - (0.75 - 2 / 3), abs=1e-6)
    assert "below FP32's 0.7500" in describe(row, m)
    assert _row(Criteria(max_accuracy_drop=0.1).judge(m), "accuracy drop")["passed"]
    assert not [x for x in Criteria(max_accuracy_drop=1).judge(m) if x["criterion"] == "accuracy drop"]   # off
    # a higher accuracy is no drop
    assert _row(Criteria().judge(against(r, ref)), "accuracy drop")["margin"] == 0.01


def test_accuracy_without_labels_is_not_applicable_and_passes():
    ref = _out([[0.9, 0.1], [0.8, 0.2]])
    m = against(Reference(ref, 2), _out([[0.1, 0.9], [0.2, 0.8]]))
    row = _row(Criteria().judge(m), "accuracy drop")
    assert row["passed"] and row["figure"] is None and "not applicable" in row["note"]


# -- the verdict as a whole ---------------------------------------------------------------------------------------

def test_every_criterion_is_named_with_figure_limit_and_margin_and_missed_says_each_failure():
    ref = _out([[0.9, 0.1], [0.2, 0.8]])
    noisy = _out([[0.9, 0.1], [0.2, 0.8]])
    m = against(Reference(ref, 2, noisy=noisy, noise_levels=1, labels=np.array([1, 2])), ref)
    rows = Criteria(min_cosine=0.99).judge(m)
    assert [r["criterion"] for r in rows] == ["study grade", "grade agreement", "gate agreement",
                                              "mask IoU (accepted frames)", "accuracy drop", "feature cosine"]
    assert all(r["passed"] and r["margin"] is not None and r["limit"] is not None for r in rows)
    assert Criteria().missed(m) == []
    assert [r["criterion"] for r in Criteria().judge(m)][-1] == "accuracy drop"     # cosine: reported, not judged
    assert Criteria.off().judge(m) == []


def test_a_figure_that_could_not_be_measured_fails_unless_its_check_is_off():
    """FP32 accepts two frames, the other run none: no grade agreement; on a set where FP32 accepts nothing, no
    mask IoU either. Not a pass, said as such; the run-time check (unmeasured_fails=False) says nothing."""
    ref = _out([[0.7, 0.3], [0.4, 0.6], NAN2, NAN2])
    oth = _out([NAN2] * 4)
    m = against(Reference(ref, 2, noisy=ref, noise_levels=1), oth)
    assert m["grade_agreement"] is None and m["gate_agreement"] == 0.5
    missed = Criteria(min_gate=0.5).missed(m)
    assert any(f.startswith("grade agreement: not measured over 4 frames") for f in missed), missed
    assert Criteria(min_gate=0.5, min_grade=0, min_study=0).missed(m) == []
    assert Criteria().missed(m, unmeasured_fails=False) == [describe(_row(Criteria().judge(m), "study grade"), m),
                                                           describe(_row(Criteria().judge(m), "gate agreement"), m)]
    empty = _out([NAN2] * 2, masks=np.zeros((2, 4, 4), bool))
    m = against(Reference(empty, 2, noisy=empty, noise_levels=1), empty)
    assert m["mask_iou_accepted_mean"] is None
    assert any(f.startswith("mask IoU (accepted frames): not measured") and "FP32's gate accepts no frame" in f
               for f in Criteria().missed(m))


def test_a_figure_that_is_not_a_number_fails_its_check():
    m = {"frames": 3, "study_agreement": 1.0, "grade_agreement": 1.0, "grade_floor": 1.0, "gate_agreement": 1.0,
         "mask_iou_accepted_mean": float("nan"), "accuracy_reference": None}
    missed = Criteria().missed(m)
    assert len(missed) == 1 and missed[0].startswith("mask IoU (accepted frames): nan is not a number")
