"""Lane decisions, without sockets: which destination a request gets, and why."""

from __future__ import annotations

import pytest

from sidecar.errors import PolicyError
from sidecar.policy import Address, parse_policy
from sidecar.proxy.lanes import (
    LANE,
    NO_LANE,
    NO_ROUTE,
    STABLE,
    TIMEOUT,
    UNCOLORED,
    LaneTable,
)

POLICY = """\
colors:
  stable: {mark: 1}
  canary: {mark: 2}
  blue: {mark: 4}
outbound:
  cluster_domain: corp.example
  routes:
    - host: reviews
      lanes:
        canary: reviews-canary
        blue: "reviews-blue.lanes:9090"
    - host: ratings.shop
      lanes: {canary: "10.1.2.3"}
      fallback: fail
timeouts:
  lane_connect: 0.25
baggage:
  key: traffic-color
"""


def table(text: str = POLICY) -> LaneTable:
    p = parse_policy(text)
    return LaneTable(p.routes, p.default_color, p.cluster_domain)


def test_policy_keys_parse() -> None:
    p = parse_policy(POLICY)
    assert p.timeouts.lane_connect == 0.25
    assert p.baggage_key == "traffic-color"
    assert p.cluster_domain == "corp.example"
    reviews, ratings = p.routes
    assert reviews.host == "reviews" and reviews.fallback == "stable" and reviews.line == 8
    assert reviews.lanes == {
        "canary": Address("reviews-canary", 0),
        "blue": Address("reviews-blue.lanes", 9090),
    }
    assert ratings.fallback == "fail"
    defaults = parse_policy("colors: {stable: {mark: 1}}\n")
    assert defaults.routes == () and defaults.baggage_key is None
    assert defaults.timeouts.lane_connect == 0.5 and defaults.cluster_domain == "cluster.local"


@pytest.mark.parametrize(
    ("snippet", "line", "text"),
    [
        ("    - host: reviews\n", 7, "a route needs 'host' and 'lanes'"),
        ("    - {host: 'a b', lanes: {canary: x}}\n", 7, "'a b' is not a service name"),
        ("    - {host: r, lanes: {gold: x}}\n", 7, "color 'gold' is not defined"),
        ("    - {host: r, lanes: {stable: x}}\n", 7, "the default color 'stable' never enters"),
        ("    - {host: r, lanes: {canary: 'x:0'}}\n", 7, "'x:0' is not HOST or HOST:PORT"),
        ("    - {host: r, lanes: {canary: x}, fallback: maybe}\n", 7, "must be stable or fail"),
        (
            "    - {host: r, lanes: {canary: x}}\n    - {host: R, lanes: {canary: y}}\n",
            8,
            "'r' already has a route (line 7)",
        ),
    ],
)
def test_bad_routes_are_rejected_with_their_line(snippet: str, line: int, text: str) -> None:
    policy = (
        "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\noutbound:\n"
        "  listen: 127.0.0.1:15001\n  routes:\n" + snippet
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(policy, "p.yaml")
    issues = [(i.line, i.message) for i in info.value.issues]
    assert any(n == line and text in m for n, m in issues), issues


def test_bad_baggage_and_timeout_keys_are_rejected() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("baggage:\n  key: 'a b'\ntimeouts:\n  lane_connect: 0\n", "p.yaml")
    lines = [i.line for i in info.value.issues]
    assert lines == [2, 4], info.value.format()
    with pytest.raises(PolicyError, match="'key' is required"):
        parse_policy("baggage: {}\n")


@pytest.mark.parametrize(
    "host",
    [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.corp.example",
        "REVIEWS.Default.svc.corp.example.",
    ],
)
def test_every_cluster_form_of_the_host_matches_on_any_port(host: str) -> None:
    for port in (80, 9080):
        choice = table().choose("canary", host, port)
        assert choice.why == LANE
        assert choice.port == port  # no port on the lane: the request's
        assert choice.original == (host, port)
        assert choice.host.startswith("reviews-canary")


def test_a_bare_lane_host_takes_the_namespace_the_request_named() -> None:
    t = table()
    assert t.choose("canary", "reviews", 80).host == "reviews-canary"
    assert t.choose("canary", "reviews.shop", 80).host == "reviews-canary.shop"
    got = t.choose("canary", "reviews.shop.svc.corp.example", 80)
    assert got.host == "reviews-canary.shop.svc.corp.example"
    # a lane that names its own domain or port keeps them
    blue = t.choose("blue", "reviews.shop.svc", 80)
    assert (blue.host, blue.port) == ("reviews-blue.lanes", 9090)


@pytest.mark.parametrize(
    "host",
    [
        "reviews.default.svc.cluster.local",  # another cluster domain than the policy's
        "reviews.default.pod",
        "reviews-v2",
        "myreviews",
        "198.18.0.10",
        "ratings",  # the route names namespace shop
        "ratings.other",
    ],
)
def test_other_hosts_keep_their_destination(host: str) -> None:
    choice = table().choose("canary", host, 80)
    assert choice.why == NO_ROUTE and (choice.host, choice.port) == (host, 80)


def test_stable_uncolored_and_laneless_colors_never_enter_a_lane() -> None:
    t = table()
    assert t.choose("stable", "reviews", 80).why == STABLE
    assert t.choose("canary", "reviews", 80, carried=False).why == UNCOLORED
    ratings = t.choose("blue", "ratings.shop", 80)
    assert ratings.why == NO_LANE and ratings.host == "ratings.shop"
    for choice in (t.choose("stable", "reviews", 80), ratings):
        assert (choice.host, choice.port) == choice.original


def test_namespace_route_and_ip_lane() -> None:
    choice = table().choose("canary", "ratings.shop.svc", 8080)
    assert (choice.host, choice.port, choice.why) == ("10.1.2.3", 8080, LANE)
    assert choice.fallback_fails


def test_fallback_keeps_the_color_and_goes_to_the_original() -> None:
    t = table()
    lane = t.choose("canary", "reviews.shop", 9080)
    back = t.fallback(lane, TIMEOUT)
    assert (back.color, back.host, back.port) == ("canary", "reviews.shop", 9080)
    assert back.describe()["reason"] == TIMEOUT and back.describe()["why"] == "fallback"


def test_decisions_are_cached_per_color_host_port() -> None:
    t = table()
    assert t.choose("canary", "reviews", 80) is t.choose("canary", "reviews", 80)
    assert t.choose("canary", "reviews", 81) is not t.choose("canary", "reviews", 80)


def test_a_captured_request_matches_its_host_name_and_falls_back_to_the_dialled_address() -> None:
    """Capture mode: the app dialled a ClusterIP; the route matches the Host's name, the
    lane gets the dialled port, and everything but the lane goes to the dialled address."""
    t = table()
    dialled = ("198.18.0.10", 9080)
    lane = t.choose("canary", "reviews.shop", 9080, original=dialled)
    assert (lane.why, lane.host, lane.port, lane.original) == (
        LANE,
        "reviews-canary.shop",
        9080,
        dialled,
    )
    back = t.fallback(lane, TIMEOUT)
    assert (back.color, back.host, back.port) == ("canary", *dialled)
    for choice in (
        t.choose("stable", "reviews", 9080, original=dialled),
        t.choose("canary", "reviews", 9080, carried=False, original=dialled),
        t.choose("canary", "details", 9080, original=dialled),
        t.choose("blue", "ratings.shop", 9080, original=dialled),
    ):
        assert choice.why != LANE and (choice.host, choice.port) == choice.original == dialled
    # the original is part of the cached decision: another captured address, another answer
    other = t.choose("canary", "reviews.shop", 9080, original=("198.18.0.11", 9080))
    assert other.original == ("198.18.0.11", 9080)
    assert t.choose("canary", "reviews.shop", 9080).original == ("reviews.shop", 9080)
