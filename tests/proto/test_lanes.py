"""Lanes in the HTTP/1 path on loopback: a lane is its own flow, told to the flow hooks.

The lane host is an address literal here (no lookup); names, the resolver and every
empty-lane reason are covered with real name resolution in tests/netns/test_lanes.py.
"""

from __future__ import annotations

from sidecar.policy import parse_policy
from sidecar.proxy import Proxy
from sidecar.proxy.lanerouter import LaneRouter
from sidecar.proxy.resolver import ResolverCache
from tests.proto.backend import Backend
from tests.proto.conftest import Conn, MakeProxy, RecordingHooks, curl, port, request, sample


async def _no_lookup(host: str) -> tuple[tuple[str, ...], float | None]:
    raise AssertionError(f"looked up {host}: address literals need no lookup")


async def test_a_lane_is_its_own_flow_with_its_color_and_the_apps_host(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    lane = await Backend().start()
    try:
        text = (
            "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n"
            "outbound:\n  routes:\n    - host: localhost\n"
            f"      lanes: {{canary: '127.0.0.1:{lane.port}'}}\n"
            "baggage:\n  key: traffic-color\n"
        )
        hooks = RecordingHooks()
        proxy = await make_proxy(policy=text, hooks=hooks)
        proxy.ctx.lanes = LaneRouter(
            parse_policy(text), ResolverCache(_no_lookup), proxy.ctx.metrics
        )
        host = f"localhost:{backend.port}"
        conn = await Conn.open(port(proxy))
        for color in ("canary", "stable", "canary", "stable", "canary"):
            await conn.send(request("GET", f"/{color}", host, {"x-traffic-color": color}))
            assert (await conn.response()).status == 200
        conn.close()
        # canary went to the lane, stable to the app's destination, each on one flow
        assert [s.target for s in lane.requests] == ["/canary"] * 3
        assert [s.target for s in backend.requests] == ["/stable"] * 2
        assert lane.connections == 1 and backend.connections == 1
        for seen, color in ((lane.requests[0], "canary"), (backend.requests[0], "stable")):
            assert seen.header("host") == [host]  # the Host the app sent, in both
            assert seen.header("x-traffic-color") == [color]
            assert seen.header("baggage") == [f"traffic-color={color}"]
        # the flow hooks heard the lane flow with its color, like any other
        assert ("canary", ("127.0.0.1", lane.port)) in {(c, r) for c, _, r in hooks.opened}
        assert {c for c, _, r in hooks.opened if r == ("127.0.0.1", backend.port)} == {"stable"}
        assert proxy.open_flows() == {"canary": 1, "stable": 1}
    finally:
        await lane.close()


async def _refused_lane(make_proxy: MakeProxy, more: str = "") -> tuple[Proxy, int]:
    """A proxy whose route ``localhost`` has a canary lane nobody listens on (refused)."""
    dead = await Backend().start()
    dead_port = dead.port
    await dead.close()  # nothing listens there any more: refused
    text = (
        "colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n"
        "outbound:\n  routes:\n    - host: localhost\n"
        f"      lanes: {{canary: '127.0.0.1:{dead_port}'}}\n" + more
    )
    proxy = await make_proxy(policy=text)
    proxy.ctx.lanes = LaneRouter(parse_policy(text), ResolverCache(_no_lookup), proxy.ctx.metrics)
    return proxy, dead_port


async def test_a_refused_lane_falls_back_once_per_ttl_of_knowing_it(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy, dead_port = await _refused_lane(make_proxy)
    conn = await Conn.open(port(proxy))
    for _ in range(3):
        req = request("GET", "/", f"localhost:{backend.port}", {"x-traffic-color": "canary"})
        await conn.send(req)
        assert (await conn.response()).status == 200
    conn.close()
    assert [s.header("x-traffic-color") for s in backend.requests] == [["canary"]] * 3
    labels = {"host": "localhost", "color": "canary", "reason": "refused"}
    assert sample(proxy, "traffic_color_lane_fallbacks_total", **labels) == 3
    # refused once, then known empty: the later requests did not try the lane again
    assert proxy.ctx.lanes.cache.known_down("127.0.0.1", dead_port) == "refused"
    assert proxy.ctx.lanes.cache.known_down("127.0.0.1", backend.port) is None


async def test_fallback_fail_answers_503_and_keeps_the_connection(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy, _ = await _refused_lane(make_proxy, "      fallback: fail\n")
    # curl, twice on one connection: %{num_connects} is 0 for a transfer that reused it
    each = ("-x", f"http://127.0.0.1:{port(proxy)}", "-w", "%{http_code} %{num_connects}\\n")
    url = f"http://localhost:{backend.port}/"
    code, out, err = await curl(
        *each, "-o", "/dev/null", "-H", "x-traffic-color: canary", url,
        "--next", *each, "-o", "/dev/null", "-H", "x-traffic-color: stable", url,
    )  # fmt: skip
    assert code == 0, err
    assert out.decode().splitlines() == ["503 1", "200 0"], (out, err)
    assert [s.header("x-traffic-color") for s in backend.requests] == [["stable"]]
