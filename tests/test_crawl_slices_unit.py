"""Slice arithmetic without a server or database."""

from __future__ import annotations

from sketchfab_similarity.core.settings import VARIABLES, Settings, parse_variable
from sketchfab_similarity.crawl.sketchfab import SketchfabClient
from sketchfab_similarity.crawl.slices import GROWTH, Slice, geometric_child, scope_key, target_sample


def test_the_root_slice_is_the_plain_listing_and_ranges_round_trip():
    assert Slice().filters() == {} and Slice().is_root and Slice().label() == "all models"
    s = Slice(10, 99, (("downloadable", True),))
    assert s.filters() == {"min_face_count": 10, "max_face_count": 99, "downloadable": True}
    assert Slice.from_key(s.key()) == s
    assert Slice.from_key(Slice(5, None).key()) == Slice(5, None)
    assert Slice(5, None).filters() == {"min_face_count": 5}


def test_a_single_face_count_splits_by_facets_until_none_is_left():
    ranged = Slice(10, 20)
    assert ranged.facet_split() is None, "a range is split by halving, not by facets"
    first = Slice(12, 12).facet_split()
    assert [c.facets for c in first] == [(("downloadable", True),), (("downloadable", False),)]
    second = first[0].facet_split()
    assert [c.facets[-1] for c in second] == [("animated", True), ("animated", False)]
    assert second[0].facet_split() is None


def test_geometric_children_are_strictly_inside_their_parent():
    for parent in (Slice(0, None), Slice(0, 1), Slice(1000, 1_000_000), Slice(7, 8)):
        child = geometric_child(parent, parent.low)
        assert child.low == parent.low and child.high is not None
        assert parent.high is None or child.high < parent.high


def test_target_sizes_start_small_then_follow_the_observed_rate():
    assert target_sample(10_000, 50, [], 10_000) < 20, "the first child is a small probe"
    # 500 records for 25 stored models: 20 records per stored model; aim at 5,000 records = 250,
    # but grow at most GROWTH-fold over the largest child so far.
    assert target_sample(10_000, 50, [(500, 25)], 0) == GROWTH * 25
    assert target_sample(10_000, 50, [(500, 25), (2000, 100)], 0) == 5_000 / 20


def test_scope_keys_and_client_urls():
    assert scope_key({"categories": None, "tags": []}) == ""
    assert scope_key({"categories": "cars", "tags": ["a"]}) == '{"categories": "cars", "tags": ["a"]}'
    client = SketchfabClient("https://api.example.test")
    url = client.listing_url({"categories": "cars", "min_face_count": 0, "animated": False, "tags": None})
    assert url == (
        "https://api.example.test/v3/search?type=models&sort_by=-publishedAt&count=24"
        "&categories=cars&min_face_count=0&animated=false"
    )
    assert client.listing_url({}, endpoint="/v3/models").endswith("/v3/models?sort_by=-publishedAt&count=24")


def test_the_cap_and_recrawl_share_are_variables():
    assert (
        VARIABLES["similarity_api_listing_cap"] == "api_listing_cap" and Settings().api_listing_cap == 10_000
    )
    assert parse_variable("similarity_api_listing_cap", " 60 ") == 60
    assert parse_variable("similarity_crawl_recrawl_percent", "25") == 25
    for bad in ({"api_listing_cap": 10}, {"crawl_recrawl_percent": 101}):
        try:
            Settings(**bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_density_sizing_scales_the_last_range_in_log_space():
    from sketchfab_similarity.crawl.slices import density_child

    parent = Slice(0, None)
    # The last range 99..999 (a factor of 10) listed 1,000 records; aiming at 500 halves the log-width.
    child = density_child(parent, 1000, Slice(99, 999), 1000, 500)
    assert child.low == 1000 and child.high == int(1001 * 10**0.5) - 1
    # Few records: grow at most GROWTH-fold in log-width; and never past the parent's top.
    assert density_child(parent, 1000, Slice(99, 999), 10, 500).high == int(1001 * 10**GROWTH) - 1
    assert density_child(Slice(0, 5000), 1000, Slice(99, 999), 10, 500) == Slice(1000, 5000)
