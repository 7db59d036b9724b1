"""Purity and PNMI on hand-made pairs, against the formulas and fairseq's implementation."""

from __future__ import annotations

from math import log

import numpy as np
import pytest

from units.quality.metrics import MetricsError, entropy, joint_counts, quality, usage


def measure(refs, hyps, **rates):
    return quality(joint_counts({"u": refs}, {"u": hyps}, **rates))


def test_perfect_one_to_one_and_a_permutation_of_it():
    refs = list("aabbc")
    h = -(2 * 0.4 * log(0.4) + 0.2 * log(0.2))
    for hyps in ([0, 0, 1, 1, 2], [7, 7, 0, 0, 3]):  # Unit names do not matter.
        got = measure(refs, hyps)
        assert got["phone_purity"] == pytest.approx(1)
        assert got["cluster_purity"] == pytest.approx(1)
        assert got["pnmi"] == pytest.approx(1)
        assert got["h_phone"] == pytest.approx(h) and got["h_unit"] == pytest.approx(h)


def test_many_units_per_phone_are_pure_but_split_the_phone():
    got = measure(list("aaaabbbb"), [0, 1, 0, 1, 2, 3, 2, 3])
    assert got["phone_purity"] == pytest.approx(1)  # Each unit is one phone.
    assert got["cluster_purity"] == pytest.approx(0.25 + 0.25)  # Each phone's best unit: 2/8.
    assert got["pnmi"] == pytest.approx(1)  # The unit still tells the phone.
    assert got["h_unit"] == pytest.approx(log(4))


def test_one_unit_for_many_phones_tells_nothing():
    got = measure(list("abcd"), [0, 0, 0, 0])
    assert got["phone_purity"] == pytest.approx(0.25)
    assert got["cluster_purity"] == pytest.approx(1)
    assert got["pnmi"] == pytest.approx(0) and got["h_unit"] == 0


def test_independent_phones_and_units():
    got = measure(list("aabb"), [0, 1, 0, 1])  # Every pair once: p = 1/4 everywhere.
    assert got["pnmi"] == pytest.approx(0, abs=1e-12)
    assert got["phone_purity"] == pytest.approx(0.5) and got["cluster_purity"] == pytest.approx(0.5)


def test_a_mixed_table_worked_out_by_hand():
    # p(a,0) = 1/2, p(a,1) = 1/4, p(b,1) = 1/4; p(a) = 3/4, p(0) = p(1) = 1/2.
    got = measure(list("aaab"), [0, 0, 1, 1])
    mi = 0.5 * log(0.5 / (0.75 * 0.5)) + 0.25 * log(0.25 / (0.75 * 0.5)) + 0.25 * log(2)
    h_phone = -(0.75 * log(0.75) + 0.25 * log(0.25))
    assert got["phone_purity"] == pytest.approx(0.5 + 0.25)
    assert got["cluster_purity"] == pytest.approx(0.5 + 0.25)
    assert got["mutual_information"] == pytest.approx(mi)
    assert got["pnmi"] == pytest.approx(mi / h_phone)


def _fairseq(p_xy):
    """comp_purity and comp_norm_mutual_info of fairseq's measure_teacher_quality.py."""
    p_x, p_y = p_xy.sum(1, keepdims=True), p_xy.sum(0, keepdims=True)
    mi = (p_xy * np.log(p_xy / (p_x @ p_y) + 1e-8)).sum()
    h_x = (-p_x * np.log(p_x + 1e-8)).sum()
    return p_xy.max(0).sum(), p_xy.max(1).sum(), mi / h_x


def test_agrees_with_fairseqs_formulas_on_random_labels():
    rng = np.random.default_rng(0)
    refs = {f"u{i}": list(rng.choice(list("abcdefgh"), size=300)) for i in range(20)}
    # Units that follow the phones most of the time, at the same rate.
    hyps = {
        u: [("abcdefgh".index(p) * 3 + rng.integers(3)) if rng.random() < 0.7 else rng.integers(30)
            for p in ph]
        for u, ph in refs.items()
    }  # fmt: skip
    joint = joint_counts(refs, hyps)
    got = quality(joint)
    want = _fairseq(joint.p)
    assert got["phone_purity"] == pytest.approx(want[0])
    assert got["cluster_purity"] == pytest.approx(want[1])
    assert got["pnmi"] == pytest.approx(want[2], abs=1e-6)
    assert 0.2 < got["pnmi"] < 0.9


def test_units_at_50hz_are_repeated_to_100hz_phones_and_cuts_are_counted():
    refs = {"u": list("aabbccdd"), "v": list("abab"), "only_ref": ["a"]}
    hyps = {"u": [0, 1, 2], "v": [5, 5], "only_hyp": [1]}  # u: 6 frames after x2, 8 phones.
    joint = joint_counts(refs, hyps, ref_rate=100, hyp_rate=50)
    assert joint.frames == 6 + 4 and joint.frame_difference == 2
    assert joint.missing == ["only_ref"] and joint.extra == ["only_hyp"]
    assert joint.counts.tolist() == [[2, 0, 0, 2], [0, 2, 0, 2], [0, 0, 2, 0]]
    assert joint.phones == ["a", "b", "c"] and joint.units == [0, 1, 2, 5]
    got = quality(joint)
    assert got["missing_utterances"] == 1 and got["extra_utterances"] == 1


def test_disjoint_utterances_and_odd_rates_are_errors():
    with pytest.raises(MetricsError, match="no utterance has both"):
        joint_counts({"a": ["x"]}, {"b": [0]})
    with pytest.raises(MetricsError, match="integer multiple"):
        joint_counts({"a": ["x"]}, {"a": [0]}, ref_rate=100, hyp_rate=30)


def test_usage_without_references():
    got = usage({"u": [0, 0, 1, 1, 1, 3], "v": []}, k=4)
    assert got["counts"] == [2, 3, 0, 1] and got["used"] == 3 and got["dead"] == 1
    assert got["mean_run_length"] == 2 and got["dedup_ratio"] == 0.5
    assert got["entropy"] == pytest.approx(entropy(np.array([2, 3, 1]) / 6))
    assert got["perplexity"] == pytest.approx(np.exp(got["entropy"]))
    assert usage({"u": [5, 5, 5, 5]}, k=8)["perplexity"] == pytest.approx(1)
