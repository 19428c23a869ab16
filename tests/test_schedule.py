import pytest
from hypothesis import given, strategies as st

from tpool_cli.errors import TpoolError
from tpool_cli.schedule import Schedule, parse_float_list, parse_int_list


def test_keep_compounds_per_reduction_layer():
    # the public token-reduction benchmark's convention: floor(196 * r^k)
    assert Schedule(keep=0.7).targets(12, 196) == {3: 137, 6: 96, 9: 67}
    assert Schedule(keep=0.5, layers=(1, 2)).targets(4, 64) == {1: 32, 2: 16}


def test_tokens_per_layer_or_per_block():
    assert Schedule(tokens=(150, 100, 50)).targets(12, 196) == {3: 150, 6: 100, 9: 50}
    assert Schedule(keep=0.5).targets(6, 64) == {1: 32, 3: 16, 4: 8}  # default layers scale with depth
    per_block = tuple(range(196, 196 - 12 * 10, -10))
    assert Schedule(tokens=per_block).targets(12, 196) == dict(enumerate(per_block))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep=0.0), "keep rate must be in (0, 1]"),
        (dict(keep=1.5), "keep rate must be in (0, 1]"),
        (dict(keep=-0.1), "keep rate must be in (0, 1]"),
        (dict(keep=0.5, layers=(6, 3)), "increasing"),
        (dict(keep=0.5, layers=(-1,)), "0-indexed"),
        (dict(tokens=(100, 120, 50)), "non-increasing"),
        (dict(tokens=(100, 0, 0)), ">= 1"),
        (dict(), "exactly one"),
    ],
)
def test_invalid_schedules(kwargs, message):
    with pytest.raises(TpoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Schedule(**kwargs)


def test_validation_against_the_model():
    with pytest.raises(TpoolError, match="out of range"):
        Schedule(keep=0.5, layers=(3, 12)).targets(12, 196)
    with pytest.raises(TpoolError, match="exceeds"):
        Schedule(tokens=(300, 100, 50)).targets(12, 196)
    with pytest.raises(TpoolError, match="one per reduction layer"):
        Schedule(tokens=(100, 50)).targets(12, 196)


@given(keep=st.floats(min_value=0.01, max_value=1.0), n=st.integers(1, 1024), depth=st.integers(4, 24))
def test_targets_are_non_increasing_and_positive(keep, n, depth):
    layers = tuple(range(1, depth, 3))
    targets = Schedule(keep=keep, layers=layers).targets(depth, n)
    values = [targets[layer] for layer in layers]
    assert all(1 <= v <= n for v in values)
    assert values == sorted(values, reverse=True)


def test_parsers():
    assert parse_int_list("3,6,9", "--layers") == (3, 6, 9)
    assert parse_float_list("0.9, 0.7", "--keep") == (0.9, 0.7)
    with pytest.raises(TpoolError, match="--layers"):
        parse_int_list("3,x", "--layers")
    with pytest.raises(TpoolError, match="--keep"):
        parse_float_list("abc", "--keep")
