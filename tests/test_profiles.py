"""Profile validation against the program's signature, including property-based checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import KilnError
from service.profiles import covers, resolve_profile

SIGNATURE = [
    {"name": "x", "dtype": "float32", "example_shape": [2, 16, 8],
     "shape": [{"symbol": "b", "min": 1, "max": 32}, {"symbol": "s", "min": 2, "max": 128}, 8]},
    {"name": "mask", "dtype": "int64", "example_shape": [2, 16],
     "shape": [{"symbol": "b", "min": 1, "max": 32}, {"symbol": "s", "min": 2, "max": 128}]},
]


def _req(b: tuple[int, int, int], s: tuple[int, int, int]) -> list[dict]:
    return [{"name": "x", "min": [b[0], s[0], 8], "opt": [b[1], s[1], 8], "max": [b[2], s[2], 8]},
            {"name": "mask", "min": [b[0], s[0]], "opt": [b[1], s[1]], "max": [b[2], s[2]]}]


def _codes(err: KilnError) -> set[str]:
    return {e["code"] for e in err.details["errors"]}


def test_default_profile_uses_program_ranges_and_example_as_opt() -> None:
    profile = resolve_profile(SIGNATURE, None)
    assert profile[0] == {"name": "x", "dtype": "float32", "min": [1, 2, 8], "opt": [2, 16, 8],
                          "max": [32, 128, 8]}


def test_unbounded_dim_needs_an_explicit_profile() -> None:
    sig = [{"name": "x", "dtype": "float32", "example_shape": [3],
            "shape": [{"symbol": "b", "min": 0, "max": None}]}]
    with pytest.raises(KilnError) as err:
        resolve_profile(sig, None)
    assert _codes(err.value) == {"unbounded_dim"}


@pytest.mark.parametrize("request_, code", [
    ([{"name": "y", "min": [1], "opt": [1], "max": [1]}], "unknown_input"),
    (_req((1, 4, 8), (2, 16, 64))[:1], "missing_input"),
    ([_req((1, 4, 8), (2, 16, 64))[0], {"name": "mask", "min": [1], "opt": [1], "max": [1]}],
     "rank_mismatch"),
    (_req((4, 2, 8), (2, 16, 64)), "profile_order"),
    (_req((1, 4, 64), (2, 16, 64)), "out_of_range"),
    ([{**_req((1, 4, 8), (2, 16, 64))[0], "max": [8, 64, 9]}, _req((1, 4, 8), (2, 16, 64))[1]],
     "static_dim_changed"),
    ([_req((1, 4, 8), (2, 16, 64))[0], _req((1, 4, 16), (2, 16, 64))[1]], "symbol_mismatch"),
    ([{**_req((1, 4, 8), (2, 16, 64))[0], "dtype": "float16"}, _req((1, 4, 8), (2, 16, 64))[1]],
     "dtype_mismatch"),
    ([{**_req((1, 4, 8), (2, 16, 64))[0], "min": [1, -2, 8]}, _req((1, 4, 8), (2, 16, 64))[1]],
     "bad_shape"),
])
def test_bad_profiles_name_input_and_dim(request_: list[dict], code: str) -> None:
    with pytest.raises(KilnError) as err:
        resolve_profile(SIGNATURE, request_)
    assert err.value.code == "invalid_profile" and err.value.status == 400
    assert code in _codes(err.value)
    assert all("input" in e for e in err.value.details["errors"])


dims = st.integers(min_value=0, max_value=200)


@given(st.tuples(dims, dims, dims), st.tuples(dims, dims, dims))
def test_accepted_profiles_are_ordered_and_in_range(b: tuple, s: tuple) -> None:
    try:
        profile = resolve_profile(SIGNATURE, _req(b, s))
    except KilnError as err:
        assert err.code == "invalid_profile" and err.details["errors"]
        return
    for p in profile:
        for lo, opt, hi, dim in zip(p["min"], p["opt"], p["max"],
                                    next(x for x in SIGNATURE if x["name"] == p["name"])["shape"]):
            assert lo <= opt <= hi
            if isinstance(dim, dict):
                assert dim["min"] <= lo and hi <= dim["max"]
            else:
                assert lo == opt == hi == dim


@given(st.tuples(dims, dims), st.tuples(dims, dims))
def test_covers_is_interval_containment(stored: tuple, asked: tuple) -> None:
    lo, hi = sorted(stored)
    alo, ahi = sorted(asked)
    s = [{"name": "x", "min": [lo], "opt": [lo], "max": [hi]}]
    r = [{"name": "x", "min": [alo], "opt": [alo], "max": [ahi]}]
    assert covers(s, r) == (lo <= alo and ahi <= hi)
