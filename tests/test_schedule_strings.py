"""gloro schedule strings against values printed from the reference library.

Provenance of REF: gloro 1.1.1 from PyPI (with tensorflow-cpu 2.15.1),
``gloro.training.schedules.Schedule(text, duration, base).as_list()``, printed on 2026-11-25.
"""
import numpy as np
import pytest

from gloronet.schedule_strings import GloroStringSchedule, parse_gloro_schedule
from gloronet.schedules import make_schedule

REF = {
    ("[0.01]-log-[50%:1.1]", 30, 0.3): [
        0.003000000000000055, 0.028459893906326857, 0.0532876426654951, 0.07751387838184061,
        0.10116705920033389, 0.12427367027589487, 0.14685840204333794, 0.1689443087967604,
        0.19055295013193727, 0.21170451742709406, 0.23241794722192735, 0.25271102309047605,
        0.27260046738124216, 0.29210202401042756, 0.3112305333353339],
    ("decay_after_half_to_0.000001", 30, 1e-3): [0.001] * 16 + [
        0.0006309573444801933, 0.00039810717055349724, 0.000251188643150958, 0.00015848931924611136,
        0.00010000000000000002, 6.309573444801932e-05, 3.981071705534973e-05, 2.5118864315095805e-05,
        1.584893192461114e-05, 1.0000000000000004e-05, 6.309573444801936e-06, 3.981071705534972e-06,
        2.5118864315095797e-06, 1.5848931924611137e-06],
    ("[0.01]-exp-[50%:1.1]", 10, 1.58): [
        0.0158, 0.04045159253518385, 0.10356527459699631, 0.2651506511893747, 0.6788459558450157],
    ("logarithmic_half", 8, 2.0): [
        0.019999999999999962, 0.9602750922654335, 1.4361859945156676, 1.7573133571001514, 2.0, 2.0, 2.0, 2.0],
    ("fixed", 5, 0.7): [0.7],
}


@pytest.mark.parametrize("key", list(REF))
def test_lists_match_the_reference(key):
    np.testing.assert_allclose(parse_gloro_schedule(*key), REF[key], rtol=1e-13, atol=0)


def _callback_values(values, epochs, steps):
    """Transcription of gloro 1.1.1 VariableScheduler (interpolate=True): the value set at each batch."""
    out, prev, cur = [], None, values[0]
    for epoch in range(epochs):
        if epoch < len(values):  # on_epoch_begin
            prev, cur = cur, values[epoch]
        out += [prev + (cur - prev) * b / steps for b in range(steps)]  # on_train_batch_begin
    return out


@pytest.mark.parametrize("key", list(REF))
def test_per_batch_values_match_the_reference_callback(key):
    text, epochs, base = key
    s = make_schedule({"kind": "gloro", "schedule": text, "base": base}, epochs)
    assert isinstance(s, GloroStringSchedule)
    steps = 7
    ours = [s(e + b / steps) for e in range(epochs) for b in range(steps)]
    np.testing.assert_allclose(ours, _callback_values(REF[key], epochs, steps), rtol=1e-13, atol=0)


def test_eps_ramp_lags_and_never_reaches_its_end_value():
    s = make_schedule({"kind": "gloro", "schedule": "[0.01]-log-[50%:1.1]"}, 30, base=0.3)
    ref = REF[("[0.01]-log-[50%:1.1]", 30, 0.3)]
    assert s(0) == s(0.9) == pytest.approx(ref[0], rel=1e-13)  # epoch 0 is flat
    assert s(5) == pytest.approx(ref[4], rel=1e-13) and s(5.5) == pytest.approx(0.5 * (ref[4] + ref[5]), rel=1e-13)
    # after the list (15 entries) runs out, the last interpolation repeats every epoch: a sawtooth
    assert s(20) == s(29) == pytest.approx(ref[13], rel=1e-13) and s(20.5) == s(28.5)
    assert max(s(e / 10) for e in range(300)) < 0.33


def test_bad_strings():
    for text in ("[0.01]", "0.01-log-1.1", "[0.01]-log-[0.5]-[1.1]"):
        with pytest.raises(ValueError):
            parse_gloro_schedule(text, 10, 1.0)
    for text in ("[1.]-[-1.]", "[0.]-exp-[1.]"):  # the reference allows the first, crashes on the second
        with pytest.raises(ValueError):
            make_schedule({"kind": "gloro", "schedule": text, "base": 1.0}, 10)
