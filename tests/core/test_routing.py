"""routing: path-segment prefixes, full-match patterns, order, methods, dot-segments (§2)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from proxy.config.model import Match, Policy, Route, Service
from proxy.core.routing import Router, has_dot_segment, split_service


def route(name: str, **match: object) -> Route:
    return Route(service="svc", name=name, match=Match(**match), policy=Policy())


def router(*routes: Route) -> Router[str]:
    service = Service(name="svc", upstream="http://127.0.0.1:1", routes=(*routes, route("default")))
    return Router([service], lambda r: r.name)


def test_routes_match_in_order_by_method_and_path():
    r = router(route("charges_post", methods=frozenset({"POST"}), path="/charges"),
               route("by_id", path_regex="/charges/ch_[0-9]+"),
               route("charges_any", path="/charges"))
    assert [r.resolve("svc", method, path) for method, path in [
        ("POST", "/charges"), ("POST", "/charges/ch_1"), ("GET", "/charges/ch_1"),
        ("GET", "/charges/ch_1/refunds"), ("GET", "/charges"), ("GET", "/chargesX"), ("GET", "/"),
    ]] == ["charges_post", "charges_post", "by_id", "charges_any", "charges_any", "default", "default"]


def test_unknown_service_resolves_to_none():
    assert router().resolve("other", "GET", "/") is None


def test_root_prefix_matches_everything():
    r = router(route("all", path="/"))
    assert r.resolve("svc", "DELETE", "/anything/at/all") == "all"


def test_a_service_whose_first_route_takes_everything_needs_no_matching():
    assert router().catch_all == {"svc": "default"}
    assert router(route("all", path="/")).catch_all == {"svc": "all"}
    for first in (route("get", methods=frozenset({"GET"})), route("charges", path="/charges"),
                  route("ids", path_regex="/[0-9]+")):
        r = router(first)
        assert r.catch_all == {}
        assert (r.resolve("svc", "POST", "/x"), r.resolve("svc", "GET", "/charges/1")) == (
            "default", "charges" if first.name == "charges" else "get" if first.name == "get" else "default")


def test_split_service():
    assert split_service("/payment/charges/x") == ("payment", "/charges/x")
    assert split_service("/payment") == ("payment", "/")
    assert split_service("/payment/") == ("payment", "/")
    assert split_service("/") == ("", "/")


SEGMENT = st.text(alphabet="abc-_.%2eE", min_size=1, max_size=5)


@given(prefix=st.lists(st.sampled_from(["a", "b", "ab", "a-b"]), min_size=1, max_size=3),
       path=st.lists(st.sampled_from(["a", "b", "ab", "a-b", "", "x"]), min_size=0, max_size=5))
def test_prefix_matches_whole_segments_only(prefix, path):
    prefix_path = "/" + "/".join(prefix)
    request_path = "/" + "/".join(path)
    r = router(route("prefixed", path=prefix_path))
    # The model: the request's segments begin with the prefix's segments.
    expected = path[:len(prefix)] == prefix
    assert (r.resolve("svc", "GET", request_path) == "prefixed") == expected


def _decoded(segment: str) -> str:
    return re.sub("%2[eE]", ".", segment)


@given(st.lists(st.one_of(st.sampled_from([".", "..", "%2e", "%2E%2e", ".%2E", "...", ".a", "a."]),
                          SEGMENT), max_size=6))
def test_dot_segments_are_found_plain_or_percent_encoded(segments):
    path = "/" + "/".join(segments)
    expected = any(_decoded(segment) in (".", "..") for segment in segments)
    assert has_dot_segment(path) is expected


def test_dot_segment_examples():
    assert has_dot_segment("/a/../b") and has_dot_segment("/a/.") and has_dot_segment("/%2E%2e/x")
    assert not has_dot_segment("/a/.well-known/b") and not has_dot_segment("/a/b.json")
    assert not has_dot_segment("/a/%252e%252e/b")  # an encoded percent sign is not a dot
