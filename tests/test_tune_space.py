"""Search-space validation and the unit-cube encoding."""

from __future__ import annotations

import numpy as np
import pytest

import pyengine as pe
from pyengine.tune.space import Space


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: pe.tune.Uniform(1.0, 1.0), "must be smaller than"),
        (lambda: pe.tune.Uniform(0.0, float("inf")), "finite"),
        (lambda: pe.tune.LogUniform(0.0, 1.0), "log scale needs low > 0"),
        (lambda: pe.tune.IntUniform(1.5, 4), "must be an int"),
        (lambda: pe.tune.IntUniform(0, 10, log=True), "log scale needs low > 0"),
        (lambda: pe.tune.Choice([]), "empty"),
        (lambda: pe.tune.Choice("abc"), "expected a list"),
        (lambda: pe.tune.Choice(["a", "a"]), "duplicates"),
        (lambda: pe.tune.Choice([object()]), "stored as JSON"),
        (lambda: Space({}), "non-empty dict"),
        (lambda: Space({"lr": (1e-4, 1e-1)}), "use pe.tune.Uniform"),
    ],
)
def test_bad_parameters_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_encode_decode_round_trip_and_rounding():
    space = Space(
        {
            "lr": pe.tune.LogUniform(1e-4, 1e-1),
            "width": pe.tune.IntUniform(16, 256),
            "layers": pe.tune.IntUniform(1, 64, log=True),
            "act": pe.tune.Choice(["relu", "tanh", None]),
            "drop": pe.tune.Uniform(0.0, 0.5),
        }
    )
    assert space.dim == 4 + 3  # one coordinate per numeric parameter, a one-hot block for the choice
    params = {"lr": 3e-3, "width": 100, "layers": 8, "act": "tanh", "drop": 0.25}
    back = space.decode(space.encode(params))
    assert back["width"] == 100 and back["layers"] == 8 and back["act"] == "tanh"
    assert back["lr"] == pytest.approx(3e-3) and back["drop"] == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = space.decode(rng.random(space.dim))
        assert 16 <= p["width"] <= 256 and isinstance(p["width"], int)
        assert 1e-4 <= p["lr"] <= 1e-1
        assert space.key(space.decode(space.round_encoded(space.encode(p)))) == space.key(p)


def test_integers_get_equal_shares_of_the_cube():
    space = Space({"k": pe.tune.IntUniform(0, 3)})
    counts = np.bincount([space.decode(np.array([x]))["k"] for x in np.linspace(0, 1, 4000)], minlength=4)
    assert counts.min() > 0.9 * counts.max()


def test_out_of_range_values_are_refused():
    space = Space({"lr": pe.tune.LogUniform(1e-4, 1e-1), "act": pe.tune.Choice(["relu"])})
    with pytest.raises(ValueError, match="outside"):
        space.encode({"lr": 1.0, "act": "relu"})
    with pytest.raises(ValueError, match="not one of"):
        space.encode({"lr": 1e-3, "act": "gelu"})
    with pytest.raises(ValueError, match="do not match"):
        space.validate({"lr": 1e-3})
