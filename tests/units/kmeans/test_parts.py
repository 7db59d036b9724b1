"""The parts interface: callers name a Part method by the method itself, and the methods that
leave state behind say so where they are defined."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from units.kmeans.parts import LocalParts, Part, StateEffect, state_effect


class _NotAPart:
    def dim(self) -> int:
        return -1


def test_parts_run_a_part_method_passed_as_itself_on_every_part():
    parts = LocalParts.from_array(np.zeros((10, 3), np.float32), parts=2, block_rows=4)
    assert parts.map(Part.dim) == [3, 3]
    rows = parts.map(Part.rows, np.array([0, 9]))
    assert [len(r) for r in rows] == [1, 1]


@pytest.mark.parametrize(
    "method",
    ["dim", _NotAPart.dim, lambda part: part.dim(), print],
    ids=["a name", "another class's method", "a lambda", "a builtin"],
)
def test_parts_refuse_anything_but_a_part_method(method):
    parts = LocalParts.from_array(np.zeros((10, 3), np.float32), parts=2, block_rows=4)
    with pytest.raises(TypeError, match="methods of Part"):
        parts.map(method)


def test_only_the_projection_and_the_seeding_distances_are_state_a_lost_part_needs_back():
    effects = {
        name: state_effect(method)
        for name, method in inspect.getmembers(Part, inspect.isfunction)
        if state_effect(method) != StateEffect()
    }
    assert effects == {
        "set_projection": StateEffect(sets=True),
        "seed_update": StateEffect(sets=True),
        "seed_weights": StateEffect(ends=(Part.seed_update,)),
    }
