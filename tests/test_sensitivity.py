"""A positive control in prediction space: can the report's paired test see a difference of the size it says
it can, and does it stay quiet when there is none?

Two models score the same simulated test sets (4,000 images; patients with 1-4 correlated images; 16 head /
medium labels and 4 tail labels seen in about 10-15 patients each). Their image noise is partly shared, as
two models of one data set err alike. Null: B is as good as A (its own noise, nothing planted). Planted: B's
scores of the tail labels' positives are raised by 0.6 noise SDs, a true tail-mAP gain (measured on 400,000
images) about equal to the minimum detectable effect the report states. Over 100 test sets each, the test
must call the null in at most 5% (false-positive rate) and the planted gain near the stated 80% power.
"""

import numpy as np
import pytest

from cxrlt.evaluation.sensitivity import Z_POWER, holm, minimum_detectable_effect
from cxrlt.evaluation.simulation import LongTailPopulation, detection

HEAD_MEDIUM = (0.4, 0.3, 0.2, 0.15, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015, 0.012, 0.011)
TAIL = (0.009, 0.008, 0.007, 0.006)
POP = LongTailPopulation(prevalence=HEAD_MEDIUM + TAIL, separation=(1.2,) * 20, frailty=0.8, patient_score=0.8,
                         label_share=0.8)


@pytest.mark.slow
def test_no_planted_difference_is_called_in_at_most_5_percent():
    r = detection(POP, None, metric="mAP_tail", n_images=4000, n_sets=100)
    print(r)
    assert r["withheld"] == 0 and abs(r["true_diff"]) < 0.005
    assert r["called"] <= 0.05


@pytest.mark.slow
def test_a_planted_tail_gain_at_the_stated_mde_is_called_at_about_the_stated_power():
    shift = np.r_[np.zeros(len(HEAD_MEDIUM)), np.full(len(TAIL), 0.6)]
    r = detection(POP, shift, metric="mAP_tail", n_images=4000, n_sets=100)
    print(r)
    assert r["withheld"] == 0 and abs(r["true_diff"] / r["mde"] - 1) < 0.1     # planted at the stated MDE
    assert 0.7 <= r["called_higher"] <= 0.95 and r["called"] == r["called_higher"]


def test_mde_is_2_8_standard_deviations_of_the_paired_replicates():
    reps = np.random.default_rng(0).normal(0.01, 0.004, 5000)
    assert Z_POWER == pytest.approx(1.95996 + 0.84162, abs=1e-4)
    assert minimum_detectable_effect(reps) == pytest.approx(Z_POWER * reps.std(ddof=1))
    assert np.isnan(minimum_detectable_effect([np.nan, 0.1]))


def test_holm_adjusts_step_down_and_keeps_the_order():
    p = [0.01, 0.04, 0.03, np.nan, 0.005]
    got = holm(p)
    # sorted: 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(got[[4, 0, 2, 1]], [0.02, 0.03, 0.06, 0.06])
    assert np.isnan(got[3])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]               # capped at 1, never below an earlier one
