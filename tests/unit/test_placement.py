"""Which model groups train which member of a suite (trainer/parallel/placement.py ``place_members``): the
largest member first onto the least loaded group, so the groups hold about the same number of
parameters; fewer members than groups: data parallel over groups of their own."""
import itertools
import random

import pytest

from trainer.parallel.placement import place_members


def loads(sizes, placement, n_groups):
    out = [0] * n_groups
    for s, groups in zip(sizes, placement):
        assert len(groups) == 1, placement
        out[groups[0]] += s
    return out


def best_max_load(sizes, n_groups):
    """The smallest possible largest group load (exhaustive: small cases only)."""
    return min(max(loads(sizes, [[g] for g in assign], n_groups))
               for assign in itertools.product(range(n_groups), repeat=len(sizes)))


@pytest.mark.parametrize("sizes,want", [
    ([32, 8, 8, 8, 8], [[0], [1], [1], [1], [1]]),  # the big one alone, the small ones together
    ([8, 8, 8, 8, 32], [[1], [1], [1], [1], [0]]),  # the same whatever the order of the members
    ([8, 32, 8, 16, 8], [[1], [0], [1], [1], [0]]),
])
def test_the_largest_member_goes_first_onto_the_least_loaded_group(sizes, want):
    got = place_members(sizes, 2, 256)
    assert got == want
    assert max(loads(sizes, got, 2)) == best_max_load(sizes, 2)


def test_groups_hold_about_the_same_number_of_parameters():
    """Longest-processing-time-first: the largest load at most 4/3 of the best possible (Graham's bound);
    a placement that ignores the sizes (in member order, round robin) misses it on these suites."""
    rng = random.Random(0)
    for _ in range(40):
        n_groups = rng.choice([2, 3])
        sizes = [rng.choice([2, 4, 8, 16, 32, 64]) for _ in range(rng.randint(n_groups, 7))]
        got = place_members(sizes, n_groups, 256)
        assert all(len(g) == 1 and 0 <= g[0] < n_groups for g in got), got
        best = best_max_load(sizes, n_groups)
        assert max(loads(sizes, got, n_groups)) * 3 <= best * 4, (sizes, n_groups, got, best)
    # a suite of widths 8, 16, 32 on 2 groups: 32x + 8x on one, 16x + 3 x 8x on the other
    sizes = [8, 32, 8, 16, 8, 8]
    assert sorted(loads(sizes, place_members(sizes, 2, 256), 2)) == [40, 40]


def test_ties_go_to_the_earlier_member_and_the_lower_group():
    assert place_members([8, 8, 8, 8], 2, 256) == [[0], [1], [0], [1]]
    assert place_members([8, 8, 8], 3, 256) == [[0], [1], [2]]


def test_fewer_members_than_groups_are_data_parallel_over_their_own_groups():
    assert place_members([8], 4, 256) == [[0, 1, 2, 3]]  # one SAE on every group: plain data parallelism
    assert place_members([8, 32], 4, 256) == [[0, 1], [2, 3]]
    assert place_members([8, 32], 4, 255) == [[0], [1]]  # dp must divide the batch: 2 does not divide 255
    assert place_members([8, 32, 8], 7, 6) == [[0, 1], [2, 3], [4, 5]]
    assert place_members([], 4, 256) == []
