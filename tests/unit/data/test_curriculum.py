import pytest

from pipeline.data.curriculum import MaskSchedule

PAPER_RATES = [
    (0.0, 0.05),
    (0.19, 0.05),
    (0.2, 0.10),
    (0.39, 0.10),
    (0.4, 0.15),
    (0.6, 0.20),
    (0.8, 0.25),
    (0.99, 0.25),
]


@pytest.mark.parametrize("fraction, expected", PAPER_RATES)
def test_paper_default_is_stepwise_5_to_25_percent(fraction, expected):
    schedule = MaskSchedule()
    assert schedule.rate(fraction) == expected


def test_step_boundaries_survive_float_division():
    # 0.3 / 0.1 == 2.9999999999999996 and 0.6 / 0.2 == 2.9999999999999996 in floats.
    fine = MaskSchedule(start=0.1, end=0.5, increment=0.01, every=0.1)
    assert fine.rate(0.3) == 0.13
    assert fine.rate(0.7) == 0.17
    assert MaskSchedule().rate(0.6) == 0.20


def test_linear_endpoints_and_midpoint():
    schedule = MaskSchedule(kind="linear", start=0.05, end=0.25)
    assert schedule.rate(0.0) == 0.05
    assert schedule.rate(0.5) == 0.15
    assert schedule.rate(1.0) == 0.25
    assert schedule.rate(0.25) < schedule.rate(0.75)


def test_constant_uses_start_and_ignores_the_rest():
    schedule = MaskSchedule.constant(0.15)
    assert schedule.kind == "constant"
    assert {schedule.rate(f) for f in (0.0, 0.3, 0.99)} == {0.15}
    assert MaskSchedule(kind="constant", start=0.3, end=0.1, every=5.0).rate(0.5) == 0.3


@pytest.mark.parametrize(
    "schedule",
    [
        MaskSchedule(),
        MaskSchedule(increment=0.07),
        MaskSchedule(start=0.1, end=0.3, increment=0.15, every=0.25),
        MaskSchedule(kind="linear", start=0.02, end=0.4),
    ],
)
def test_rate_never_exceeds_end_and_never_decreases(schedule):
    rates = [schedule.rate(i / 1000) for i in range(1000)]
    assert max(rates) <= schedule.end
    assert min(rates) == schedule.start
    assert all(a <= b for a, b in zip(rates, rates[1:]))


def test_increment_that_overshoots_is_capped():
    assert MaskSchedule(increment=0.07).rate(0.8) == 0.25


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"kind": "cosine"}, "kind"),
        ({"start": 0.0}, "start"),
        ({"start": 1.5}, "start"),
        ({"end": 1.2}, "end"),
        ({"start": 0.3, "end": 0.2}, "start"),
        ({"increment": 0.0}, "increment"),
        ({"every": 0.0}, "every"),
        ({"every": 1.5}, "every"),
        ({"every": "0.2"}, "every"),
        ({"start": True}, "start"),
        ({"kind": "linear", "start": 0.3, "end": 0.1}, "start"),
    ],
)
def test_building_a_bad_schedule_names_the_field(kwargs, key):
    """The field's own name only: the config loader puts `masking.schedule.` in front."""
    with pytest.raises(ValueError, match=f"^{key}: "):
        MaskSchedule(**kwargs)


def test_linear_and_constant_ignore_the_keys_they_do_not_use():
    MaskSchedule(kind="linear", increment=0.0, every=0.0)
    MaskSchedule(kind="constant", start=0.3, end=0.1, increment=-1.0, every=5.0)


def test_rate_rejects_fraction_outside_an_epoch():
    with pytest.raises(ValueError, match="epoch_fraction"):
        MaskSchedule().rate(1.5)
