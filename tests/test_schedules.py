import math

import numpy as np
import pytest

from gloronet.schedules import (
    Constant, ExpDecay, GeometricRamp, LinearRamp, LogLerpExpRamp, WarmupCosine, make_schedule,
)

TOTAL = 300


def values(s, stop=TOTAL, n=1201):
    return np.array([s(e) for e in np.linspace(0, stop, n)])


def test_constant_from_bare_number_none_and_dict():
    assert isinstance(make_schedule(0.3, TOTAL), Constant)
    assert make_schedule(0.3, TOTAL)(123.4) == 0.3
    assert make_schedule(2, TOTAL)(0) == 2.0
    assert make_schedule(None, TOTAL, base=1.58)(7) == 1.58
    assert make_schedule({"kind": "constant", "value_factor": 1.5}, TOTAL, base=0.3)(9) == pytest.approx(0.45)
    s = make_schedule(0.3, TOTAL)
    assert make_schedule(s, TOTAL) is s


def test_linear_ramp_endpoints_monotone_and_hold():
    s = make_schedule({"kind": "linear", "start": 0.0, "end": 2.0, "ramp_epochs": 100}, TOTAL)
    assert isinstance(s, LinearRamp)
    assert s(0) == 0.0 and s(100) == 2.0 and s(50) == pytest.approx(1.0)
    assert s(25.5) == pytest.approx(2.0 * 25.5 / 100)
    v = values(s)
    assert np.all(np.diff(v) >= 0)
    assert all(s(e) == 2.0 for e in (100, 150.25, 299, 300))
    # fractions of the run
    f = make_schedule({"kind": "linear", "start": 0.5, "end": 20, "ramp_fraction": 0.5}, 500)
    assert f(0) == 0.5 and f(250) == 20 and f(400) == 20


def test_geometric_ramp():
    eps = 1.58
    s = make_schedule({"kind": "geometric", "start_factor": 0.01, "end_factor": 1.1, "ramp_fraction": 0.5},
                      total_epochs=TOTAL, base=eps)
    assert isinstance(s, GeometricRamp)
    assert s(0) == pytest.approx(0.01 * eps, rel=1e-12)
    assert s(150) == pytest.approx(1.1 * eps, rel=1e-12)
    assert all(s(e) == s(150) for e in (150, 151.5, 300))
    v = values(s)
    assert np.all(np.diff(v) > -1e-15) and v[0] < v[-1]
    # geometric: equal ratios in equal times; the midpoint is the geometric mean
    assert s(75) == pytest.approx(math.sqrt(s(0) * s(150)), rel=1e-12)
    assert s(30) / s(0) == pytest.approx(s(60) / s(30), rel=1e-12)


def test_log_lerp_exp_is_gloros_log_transition():
    # Reference formula, klasleino/gloro training/schedules.py::_log_interp:
    #   np.log((np.exp(end) - np.exp(start)) / duration * i + np.exp(start))
    eps = 0.3
    s = make_schedule({"kind": "log_lerp_exp", "start_factor": 0.01, "end_factor": 1.1, "ramp_fraction": 0.5},
                      total_epochs=30, base=eps)
    assert isinstance(s, LogLerpExpRamp)
    a, b = 0.01 * eps, 1.1 * eps
    for e in (0, 1, 3.5, 7, 14.99):
        i, d = e, 15
        assert s(e) == pytest.approx(np.log((np.exp(b) - np.exp(a)) / d * i + np.exp(a)), rel=1e-12)
    assert s(15) == pytest.approx(b, rel=1e-12) and s(29) == s(15)
    # printed from gloro 1.1.1 (PyPI): Schedule("[0.01]-log-[50%:1.1]", 30, 0.3).as_list()[7]; its
    # list entry i is the value at i / 15 of the ramp
    assert s(7) == pytest.approx(0.1689443087967604, rel=1e-12)
    # concave and far above the geometric ramp in the middle (the old, ambiguous 'log')
    g = make_schedule({"kind": "geometric", "start_factor": 0.01, "end_factor": 1.1, "ramp_fraction": 0.5}, 30, eps)
    assert s(7.5) > 0.5 * (a + b) > 4 * g(7.5)


def test_old_log_kind_is_refused_with_the_new_names():
    with pytest.raises(ValueError, match="'log' was removed.*log_lerp_exp.*geometric"):
        make_schedule({"kind": "log", "start_factor": 0.01, "end_factor": 1.1, "ramp_fraction": 0.5}, 30, 0.3)


def test_cosine_warmup_is_linear_and_ends_at_final():
    s = make_schedule({"kind": "cosine", "peak": 1e-3, "warmup_epochs": 20, "final_factor": 1e-5}, 820)
    assert isinstance(s, WarmupCosine)
    assert s(0) == 0.0 and s(20) == pytest.approx(1e-3)
    w = np.array([s(e) for e in np.linspace(0, 20, 41)])
    assert np.allclose(np.diff(w), np.diff(w)[0])  # linear warm-up
    assert s(820) == pytest.approx(1e-8, rel=1e-9)
    assert s(900) == pytest.approx(1e-8, rel=1e-9)
    assert s(420) == pytest.approx((1e-3 + 1e-8) / 2)  # half-way through the cosine
    after = np.array([s(e) for e in np.linspace(20, 820, 801)])
    assert np.all(np.diff(after) <= 0)  # decreasing after warm-up
    a = make_schedule({"kind": "cosine", "peak": 2.0, "warmup_fraction": 0.1, "warmup_start": 1.0,
                       "final": 0.5}, 100)
    assert a(0) == 1.0 and a(5) == pytest.approx(1.5) and a(10) == 2.0 and a(100) == 0.5


def test_exp_decay_gloro_lr():
    s = make_schedule({"kind": "exp_decay", "value": 1e-3, "final": 1e-6, "decay_start_fraction": 0.5},
                      TOTAL)
    assert isinstance(s, ExpDecay)
    assert all(s(e) == 1e-3 for e in (0, 75.3, 150))
    assert s(300) == 1e-6 and s(310) == 1e-6
    assert s(225) == pytest.approx(math.sqrt(1e-3 * 1e-6), rel=1e-12)
    v = values(s)
    assert np.all(np.diff(v) <= 0)
    # geometric: constant ratio per epoch during the decay
    assert s(200) / s(180) == pytest.approx(s(260) / s(240), rel=1e-12)
    e = make_schedule({"kind": "exp_decay", "value": 2.5e-4, "final_factor": 2e-3, "decay_start": 125}, 250)
    assert e(125) == 2.5e-4 and e(250) == pytest.approx(5e-7)


def test_repr_is_informative():
    s = make_schedule({"kind": "geometric", "start": 0.01, "end": 1.0, "ramp_epochs": 10}, 20)
    assert repr(s) == "GeometricRamp(start=0.01, end=1, ramp_epochs=10)"
    assert "ExpDecay(" in repr(make_schedule({"kind": "exp_decay", "value": 1, "final": 0.1}, 5))


@pytest.mark.parametrize("spec, match", [
    ({"kind": "sawtooth", "value": 1}, "kind"),
    ({"value": 1}, "kind"),
    ({"kind": "linear", "start": 0, "end": 1, "ramp_epochs": 5, "ramp": 3},
     r"unknown key 'ramp'.*allowed keys: start"),
    ({"kind": "linear", "start": 0, "end": 1}, r"missing key 'ramp_epochs'"),
    ({"kind": "linear", "start": 0, "ramp_epochs": 3}, r"missing key 'end'"),
    ({"kind": "linear", "start": 0, "end": 1, "ramp_epochs": 5, "ramp_fraction": 0.5}, "not both"),
    ({"kind": "linear", "start": -1, "end": 1, "ramp_epochs": 5}, r"'start' must be finite and >= 0"),
    ({"kind": "linear", "start": 0, "end": "big", "ramp_epochs": 5}, r"'end' must be a number"),
    ({"kind": "geometric", "start": 0, "end": 1, "ramp_epochs": 5}, "start > 0"),
    ({"kind": "log_lerp_exp", "start_factor": 0.01, "end_factor": 1.1, "ramp_fraction": 0.5}, "no base"),
    ({"kind": "gloro", "schedule": "[0.01]-log-[50%:1.1]"}, "needs 'base'"),
    ({"kind": "gloro", "schedule": "[0.01]-lg-[50%:1.1]", "base": 1}, "unknown transition '-lg-'"),
    ({"kind": "gloro", "schedule": 3, "base": 1}, "must be a gloro schedule string"),
    ({"kind": "gloro", "schedule": "[1]-[0.5]", "sched": 1, "base": 1}, "unknown key 'sched'"),
    ({"kind": "cosine", "warmup_epochs": 2}, r"missing key 'peak'"),
    ({"kind": "cosine", "peak": 1, "warmup_epochs": 200}, "warm-up"),
    ({"kind": "exp_decay", "value": 1e-3, "final": 0}, "final > 0"),
    ({"kind": "exp_decay", "value": 1e-3}, r"missing key 'final'"),
    (-0.5, ">= 0"),
    ("fast", "number or a dict"),
])
def test_bad_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(spec, 100)


def test_bad_total_and_base():
    with pytest.raises(ValueError, match="total_epochs"):
        make_schedule(1.0, 0)
    with pytest.raises(ValueError, match="base"):
        make_schedule(None, 10)


def test_log_lerp_exp_scaled_is_the_icml_snapshot_logarithmic_half():
    # klasleino/gloro snapshots/leino21_snapshot.zip, train_margin_models_clean.py EpsilonScheduler
    # 'logarithmic_half' with overcompensate_eps 1.1: per epoch i <= d//2,
    #   1.1 * eps * np.log((np.exp(1.) - np.exp(0.01)) / (d // 2) * i + np.exp(0.01))
    eps, d = 0.141, 800
    s = make_schedule({"kind": "log_lerp_exp", "start": 0.01, "end": 1.0, "scale_factor": 1.1,
                       "ramp_fraction": 0.5}, d, base=eps)
    for i in (0, 1, 57, 200, 399, 400, 600):
        ref = 1.1 * eps * np.log((np.exp(1.0) - np.exp(0.01)) / (d // 2) * min(i, d // 2) + np.exp(0.01))
        assert s(i) == pytest.approx(ref, rel=1e-12)
