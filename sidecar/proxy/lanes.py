"""Which destination a colored request gets: its lane's host, or its own. Pure; no sockets.

A lane route (policy ``outbound.routes``) names a service and, per color, the host
serving that color's version of it (one Service per version, as Argo Rollouts'
``canaryService``/``stableService``). ``LaneTable.choose`` answers, for a request's
color and the host and port it names (``Host`` in HTTP/1, ``:authority`` in
HTTP/2), where to connect and why. A request only enters a lane when it carried a
color of its own (header or baggage) that is not the policy's default color:
stable and uncolored traffic always goes where the app sent it.

In capture mode the name still comes from the request (the app dialled an
address, e.g. a ClusterIP, and routes name services), the port is the one
dialled, and ``original``, the captured destination, is where every choice but a
lane's goes and where an empty lane falls back.

Whether the lane is empty (its name does not resolve, resolves to nothing, refuses
or does not answer within ``timeouts.lane_connect``) is found out by connecting:
``sidecar.proxy.lanerouter.LaneRouter`` does that I/O, counts fallbacks and turns
an empty lane into the original destination, or into a 503 with ``fallback: fail``.

How a protocol path uses lanes (HTTP/1 in ``http1/downstream.py``, HTTP/2 in
``http2/connection.py`` and ``http2/pool.py`` with ``:authority``)::

    choice = ctx.lanes.choose(color, host, port, carried, original)  # pure, cached
    if choice.why == LANE:
        try:
            conn = await ctx.lanes.open(choice, connect)     # connect(ip, timeout)
        except EmptyLane as exc:
            choice = ctx.lanes.fall_back(choice, exc.reason) # counted; None: answer 503
                                                             # (gRPC: UNAVAILABLE)
    # else / then: connect to (choice.host, choice.port) as usual, keeping the color;
    # pool keys use (color, choice.host, choice.port), so lane flows never mix.

For HTTP/2, where many streams wait on one new upstream connection of a lane key
(``sidecar/proxy/http2/pool.py``), ``open`` wraps that connection's connect
(``connect(ip, timeout)`` dials the address the cache found, at the key's port); on
``EmptyLane`` each waiting stream gets ``fall_back`` (counted per stream) and is
assigned again under ``(color, *choice.original)``, or fails UNAVAILABLE when
``fall_back`` answers None. Streams that find a live lane connection need neither.

Host matching, for a route ``reviews`` and cluster domain ``cluster.local``:
``reviews``, ``reviews.NS``, ``reviews.NS.svc`` and ``reviews.NS.svc.cluster.local``
match, on any port; a route ``reviews.shop`` matches only namespace ``shop``. A
lane host without a dot gets the namespace part of the request's host
(``reviews.shop.svc`` -> ``reviews-canary.shop.svc``), so it names the lane of the
same namespace the app addressed; a lane without a port uses the request's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.policy import LaneRoute

# Why a destination was chosen (``Choice.why``), as /debug/route reports it.
LANE = "lane"  # the color has a lane for this host: connect there
NO_ROUTE = "no-route"  # no route names this host: the original destination
NO_LANE = "no-lane"  # a route, but no lane for this color: the original destination
STABLE = "stable"  # the default color never enters a lane
UNCOLORED = "uncolored"  # the request carried no color of its own: never enters a lane
FALLBACK = "fallback"  # the lane was empty: back to the original destination

# Why a lane is empty; label values of traffic_color_lane_fallbacks_total{reason}.
# Only ever add to this list.
UNRESOLVED = "unresolved"  # the lane's name does not resolve
NO_ADDRESS = "no-address"  # it resolves to no address
REFUSED = "refused"  # the connection was refused (or reset at once)
TIMEOUT = "timeout"  # no answer within timeouts.lane_connect
EMPTY_REASONS = (UNRESOLVED, NO_ADDRESS, REFUSED, TIMEOUT)

_CACHE = 4096  # decisions remembered before the cache starts over


class EmptyLane(Exception):
    """The lane of a choice has nobody to serve it; ``reason`` is one of EMPTY_REASONS."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"lane {host} is empty: {reason}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Choice:
    """Where one request goes. ``original`` is the request's own destination."""

    color: str
    host: str
    port: int
    why: str
    original: tuple[str, int]
    route: LaneRoute | None = None
    reason: str | None = None  # with FALLBACK: why the lane was empty

    @property
    def fallback_fails(self) -> bool:
        """An empty lane answers 503 instead of falling back (``fallback: fail``)."""
        return self.route is not None and self.route.fallback == "fail"

    def describe(self) -> dict:
        """The JSON of /debug/route."""
        out: dict = {
            "color": self.color,
            "destination": _hostport(self.host, self.port),
            "why": self.why,
            "original": _hostport(*self.original),
        }
        if self.route is not None:
            out["route"] = {"host": self.route.host, "line": self.route.line}
            out["fallback"] = self.route.fallback
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LaneTable:
    """The lane decisions of one policy (rebuilt on reload)."""

    def __init__(
        self, routes: tuple[LaneRoute, ...], default_color: str, cluster_domain: str
    ) -> None:
        self.routes = routes
        self.default_color = default_color
        self._domain = tuple(cluster_domain.split("."))
        # first label -> [(namespace or None, route)]
        self._by_name: dict[str, list[tuple[str | None, LaneRoute]]] = {}
        for route in routes:
            name, _, ns = route.host.partition(".")
            ns = ns.split(".", 1)[0] if ns else None
            self._by_name.setdefault(name, []).append((ns, route))
        self._cache: dict[tuple[str, str, int, bool, tuple[str, int] | None], Choice] = {}

    def match(self, host: str) -> tuple[LaneRoute, str] | None:
        """The route naming ``host`` and the part of ``host`` after the service name."""
        host = host.lower().rstrip(".")
        name, dot, rest = host.partition(".")
        candidates = self._by_name.get(name)
        if not candidates:
            return None
        labels = tuple(rest.split(".")) if dot else ()
        if labels and not _namespace_form(labels, self._domain):
            return None
        ns = labels[0] if labels else None
        for want, route in candidates:
            if want is None or want == ns:
                return route, (dot + rest)
        return None

    def choose(
        self,
        color: str,
        host: str,
        port: int,
        carried: bool = True,
        original: tuple[str, int] | None = None,
    ) -> Choice:
        """Where a request of ``color`` to ``host:port`` goes now, and why.

        ``carried``: the color came with the request (header or baggage) rather than
        being the pod's own for a request that had none. ``original``: where the
        request goes unless it enters a lane, when that is not ``host:port`` itself
        (capture mode: the destination the app dialled).
        """
        key = (color, host, port, carried, original)
        try:
            return self._cache[key]
        except KeyError:
            pass
        choice = self._choose(color, host, port, carried, original or (host, port))
        if len(self._cache) >= _CACHE:
            self._cache.clear()
        self._cache[key] = choice
        return choice

    def _choose(
        self, color: str, host: str, port: int, carried: bool, original: tuple[str, int]
    ) -> Choice:
        if is_ip(host):
            return Choice(color, *original, NO_ROUTE, original)
        found = self.match(host)
        if found is None:
            return Choice(color, *original, NO_ROUTE, original)
        route, suffix = found
        if color == self.default_color:
            return Choice(color, *original, STABLE, original, route)
        if not carried:
            return Choice(color, *original, UNCOLORED, original, route)
        lane = route.lanes.get(color)
        if lane is None:
            return Choice(color, *original, NO_LANE, original, route)
        lane_host = lane.host
        if "." not in lane_host and not is_ip(lane_host):
            lane_host += suffix
        return Choice(color, lane_host, lane.port or port, LANE, original, route)

    @staticmethod
    def fallback(choice: Choice, reason: str) -> Choice:
        """The original destination of a lane choice whose lane turned out empty."""
        host, port = choice.original
        return Choice(choice.color, host, port, FALLBACK, choice.original, choice.route, reason)


def _namespace_form(labels: tuple[str, ...], domain: tuple[str, ...]) -> bool:
    """``NS``, ``NS.svc`` or ``NS.svc.<cluster domain>`` after the service name."""
    n = len(labels)
    if n == 1:
        return True
    return labels[1] == "svc" and (n == 2 or labels[2:] == domain)


def is_ip(host: str) -> bool:
    """An address literal: never looked up, never matched by a route."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
