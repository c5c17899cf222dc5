"""Length bands across replicas (core.replica_bands): pure, no Ray."""

from __future__ import annotations

from bucketserve.core.replica_bands import LengthBands, band_edges, band_of, ranked_by_band


def test_length_bands_give_each_replica_an_equal_share_of_the_tokens() -> None:
    assert band_edges(list(range(1, 101)), 2) == [72]  # 1..71 and 72..100 hold ~2,550 tokens each
    assert band_edges([5] * 4 + [301] * 4, 2) == [6]  # short chats apart from long documents
    edges = band_edges([10, 20, 30, 40] * 5, 4)
    assert [band_of(n, edges) for n in (10, 20, 30, 40)] == [0, 1, 2, 3]


def test_equal_lengths_share_a_band_and_surplus_bands_stay_empty() -> None:
    assert band_edges([5] * 8, 2) == [6]
    assert band_edges([7], 3) == [8, 9]
    assert band_edges([], 3) == [] and band_edges([1, 2], 1) == []


def test_a_request_tries_its_own_band_first_then_the_nearer_ones() -> None:
    assert ranked_by_band(0, 3) == [0, 1, 2]
    assert ranked_by_band(2, 4) == [2, 1, 3, 0]


def test_a_request_goes_to_its_bands_replica_while_that_replica_has_seats() -> None:
    bands = LengthBands(seats=4)
    for n in [10] * 8 + [1000] * 2:
        bands.observe(n)
    assert bands.rank(10, [3, 0]) == [[0], [1]]
    assert bands.rank(1000, [0, 3]) == [[1], [0]]


def test_a_full_bands_replica_sends_the_request_to_the_least_loaded_one_with_seats() -> None:
    bands = LengthBands(seats=4)
    for n in [10] * 8 + [1000] * 2:
        bands.observe(n)
    assert bands.rank(10, [4, 1]) == [[1], [0]]
    assert bands.rank(10, [5, 4]) == [[0], [1]]  # every replica is full: the band decides
