"""Policy file (YAML, version 1) -> validated, frozen ``Policy``. Pure: no I/O but reading text.

Every problem is reported with the line it sits on, all at once, so that
``traffic-color check`` reads like a compiler and a bad ConfigMap is rejected
with reasons while the running policy stays in force. The YAML is walked as a
node tree (``yaml.compose``) rather than loaded, because only nodes know their
line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from sidecar.errors import PolicyError, PolicyIssue

COLOR_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")
# RFC 9110 token, lower-case only: header names are compared lower-cased.
HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A DNS name (lower-case labels) or an IP literal: an ``outbound.routes`` host or lane.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\Z")
FALLBACKS = ("stable", "fail")  # what an empty lane does: the original destination, or 503
MAX_COLORS = 63  # color ids 1..63; 0 means "no color" in the kernel's tables
RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local
DEFAULT_FLOW_TABLE_SIZE = 65536
DEFAULT_RULE_PRIORITY = 10000
# Server-first protocols (SMTP, submission, MySQL, Galera, PostgreSQL, Redis,
# Elasticsearch transport, memcached): the client waits for the server, so
# captured connections to these ports skip protocol detection (Linkerd's list).
DEFAULT_OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
DEFAULT_OWNER_UID = 1337
# SO_MARK bit on the sidecar's own upstream sockets: capture never redirects them,
# whatever uid the sidecar runs as. Setting it needs CAP_NET_ADMIN, which apps lack.
DEFAULT_OWN_MARK = 0x13370000

DEFAULT_POLICY_TEXT = """\
version: 1
header: x-traffic-color
default_color: stable
mark_mask: 0xff
colors:
  stable: {mark: 0x1}
  canary: {mark: 0x2}
inbound:
  listen: "0.0.0.0:15006"
  app: "127.0.0.1:8080"
  trust_header: true
  trusted_sources: []
  rules: []
outbound:
  listen: "127.0.0.1:15001"
admin:
  listen: "0.0.0.0:15090"
datapath:
  enabled: false
"""


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Address:
    """A listen or connect address; ``host`` is an IP literal or a name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Color:
    """A lane: its kernel id (index in the color table), mark and options."""

    name: str
    id: int
    mark: int
    priority: int | None = None
    dscp: int | None = None


@dataclass(frozen=True)
class Match:
    """Both parts, when given, must match (exact, case-sensitive value)."""

    header: tuple[str, str] | None = None  # (lower-case name, value)
    cookie: tuple[str, str] | None = None


@dataclass(frozen=True)
class StickyKey:
    """Where a split takes its key from: ``header:NAME`` or ``cookie:NAME``."""

    source: str  # "header" or "cookie"
    name: str  # header names lower-case; cookie names as written


@dataclass(frozen=True)
class Rule:
    """Either a match rule (``match`` + ``color``) or a split (``split`` + ``sticky_key``)."""

    line: int
    color: str | None = None
    match: Match | None = None
    split: tuple[tuple[str, int], ...] = ()  # (color, percent) in file order
    sticky_key: StickyKey | None = None


@dataclass(frozen=True)
class Inbound:
    listen: Address
    app: Address
    trust_header: bool
    trusted_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``drain`` bounds the graceful stop."""

    header_read: float = 10.0
    idle: float = 60.0
    connect: float = 2.0
    upstream_idle: float = 30.0
    upstream_read: float = 60.0
    drain: float = 10.0
    lane_connect: float = 0.5  # a lane host that does not answer within it is empty


@dataclass(frozen=True)
class AttachPoint:
    interface: str
    direction: str  # "ingress" or "egress"
    netns: str | None = None


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    via: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    dev: str | None = None


@dataclass(frozen=True)
class ColorRouting:
    table: int
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class Routing:
    netns: str | None = None
    rule_priority: int = DEFAULT_RULE_PRIORITY
    colors: dict[str, ColorRouting] = field(default_factory=dict)


@dataclass(frozen=True)
class Datapath:
    enabled: bool = False
    required: bool = False
    flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE
    attach: tuple[AttachPoint, ...] = ()
    routing: Routing = field(default_factory=Routing)


@dataclass(frozen=True)
class LaneRoute:
    """``outbound.routes[]``: requests to ``host`` whose color has a lane go to its host.

    ``host`` is a Service name, optionally with its namespace (``reviews``,
    ``reviews.shop``); a lane is an ``Address`` whose port 0 means "the request's".
    """

    line: int
    host: str
    lanes: dict[str, Address]
    fallback: str = "stable"  # one of FALLBACKS


@dataclass(frozen=True)
class CaptureOutbound:
    exclude_ports: tuple[int, ...] = ()
    include_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # () = all
    exclude_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class CaptureInbound:
    exclude_ports: tuple[int, ...] = ()  # the admin and listener ports are always excluded


@dataclass(frozen=True)
class Capture:
    """Transparent capture (nftables table ``inet traffic_color``) and protocol detection."""

    enabled: bool = False
    owner_uid: int = DEFAULT_OWNER_UID
    own_mark: int = DEFAULT_OWN_MARK
    detect_timeout: float = 5.0  # seconds of client silence before a flow is relayed opaque
    opaque_ports: tuple[int, ...] = DEFAULT_OPAQUE_PORTS
    outbound: CaptureOutbound = field(default_factory=CaptureOutbound)
    inbound: CaptureInbound = field(default_factory=CaptureInbound)


@dataclass(frozen=True)
class Policy:
    version: int
    header: str
    default_color: str
    mark_mask: int
    colors: dict[str, Color]
    inbound: Inbound
    outbound_listen: Address
    admin_listen: Address
    timeouts: Timeouts
    datapath: Datapath
    digest: str  # sha256 of the source text, first 16 hex digits
    source: str = "<default>"
    routes: tuple[LaneRoute, ...] = ()  # outbound.routes, in file order
    cluster_domain: str = "cluster.local"  # outbound.cluster_domain
    baggage_key: str | None = None  # baggage.key: the W3C Baggage member with the color
    capture: Capture = field(default_factory=Capture)

    def color_by_id(self) -> dict[int, Color]:
        return {c.id: c for c in self.colors.values()}


# ------------------------------------------------------------ node walking


class _Checker:
    """Collects issues while walking composed YAML nodes."""

    def __init__(self) -> None:
        self.issues: list[PolicyIssue] = []
        # Every name under ``colors``, valid or not: a reference to a color whose own
        # entry is wrong is not reported again as "not defined".
        self.declared_colors: set[str] = set()

    def err(self, node: yaml.Node, message: str) -> None:
        self.issues.append(PolicyIssue(node.start_mark.line + 1, message))

    # scalars ------------------------------------------------------------
    def scalar(self, node: yaml.Node, what: str) -> Any:
        """The node's Python value if it is a plain scalar, else record an issue."""
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, f"{what}: expected a single value, got a {_kind(node)}")
            return None
        return yaml.safe_load(yaml.serialize(node))

    def string(self, node: yaml.Node, what: str) -> str | None:
        value = self.scalar(node, what)
        if value is None and isinstance(node, yaml.ScalarNode):
            self.err(node, f"{what}: expected a string, got null")
            return None
        # YAML turns 'on'/'1'/'0x1' into other types; names must be strings.
        if value is not None and not isinstance(value, str):
            self.err(node, f"{what}: expected a string, got {type(value).__name__} {value!r}")
            return None
        return value

    def integer(self, node: yaml.Node, what: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(node, f"{what}: expected an integer, got {value!r}")
            return None
        if not lo <= value <= hi:
            self.err(
                node,
                f"{what}: {value:#x} is out of range [{lo:#x}, {hi:#x}]"
                if hi > 0xFFFF
                else f"{what}: {value} is out of range [{lo}, {hi}]",
            )
            return None
        return value

    def number(self, node: yaml.Node, what: str) -> float | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            self.err(node, f"{what}: expected a positive number of seconds, got {value!r}")
            return None
        return float(value)

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        value = self.scalar(node, what)
        if value is not None and not isinstance(value, bool):
            self.err(node, f"{what}: expected true or false, got {value!r}")
            return None
        return value

    # collections ----------------------------------------------------------
    def mapping(
        self, node: yaml.Node, what: str, allowed: set[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key -> (key node, value node); reports unknown and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.err(node, f"{what}: expected a mapping, got a {_kind(node)}")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            if key is None:
                self.err(knode, f"{what}: keys must be plain strings")
                continue
            if key in out:
                self.err(knode, f"{what}: duplicate key '{key}'")
                continue
            if allowed and key not in allowed:
                self.err(
                    knode,
                    f"{what}: unknown key '{key}' (expected one of: {', '.join(sorted(allowed))})",
                )
                continue
            out[key] = (knode, vnode)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.err(node, f"{what}: expected a list, got a {_kind(node)}")
            return []
        return list(node.value)

    def address(self, node: yaml.Node, what: str, listen: bool = True) -> Address | None:
        text = self.string(node, what)
        if text is None:
            return None
        addr = parse_address(text, listen)
        if addr is None:
            self.err(node, f"{what}: '{text}' is not HOST:PORT (IPv6 as [ADDR]:PORT)")
        return addr


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "value"


def parse_address(text: str, listen: bool = False) -> Address | None:
    """``host:port`` or ``[v6]:port`` -> Address; None when malformed.

    A listen address may use port 0 (the kernel picks one: tests, local runs).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif not host or ":" in host:
        return None
    return Address(host, int(port))


# ------------------------------------------------------------------ parsing

_TOP = {
    "version",
    "header",
    "default_color",
    "mark_mask",
    "colors",
    "inbound",
    "outbound",
    "admin",
    "timeouts",
    "datapath",
    "baggage",
    "capture",
}


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate ``text``; raise ``PolicyError`` listing every issue with its line."""
    ck = _Checker()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None:
            problem += f" ({context} started at line {cmark.line + 1})"
        raise PolicyError(source, [PolicyIssue(line, f"YAML syntax: {problem}")]) from None
    if root is None:
        raise PolicyError(source, [PolicyIssue(1, "empty policy: expected a mapping")])
    top = ck.mapping(root, "policy", _TOP)
    if not top and not ck.issues:
        ck.err(root, "policy: expected a mapping")

    def get(key: str, conv: Callable[[yaml.Node], Any], default: Any) -> Any:
        if key not in top:
            return default
        value = conv(top[key][1])
        return default if value is None else value

    version = get("version", lambda n: ck.integer(n, "version", 0, 1 << 31), 1)
    if version != 1:
        ck.err(top["version"][1], f"version: {version} is not supported (this sidecar reads 1)")
    header = get("header", lambda n: ck.string(n, "header"), "x-traffic-color")
    if not HEADER_NAME_RE.match(header):
        ck.err(top["header"][1], f"header: '{header}' is not a lower-case HTTP header name")
    mark_mask = get("mark_mask", lambda n: ck.integer(n, "mark_mask", 1, 0xFFFFFFFF), 0xFF)

    colors = _colors(ck, top.get("colors"), mark_mask)
    default_color = get("default_color", lambda n: ck.string(n, "default_color"), "stable")
    if colors and default_color not in colors and default_color not in ck.declared_colors:
        node = top["default_color"][1] if "default_color" in top else root
        ck.err(node, f"default_color: '{default_color}' is not defined under colors")

    inbound = _inbound(ck, top.get("inbound"), colors)
    outbound_listen, routes, cluster_domain = _outbound(
        ck, top.get("outbound"), colors, default_color
    )
    admin_listen = _listen_section(ck, top.get("admin"), "admin", "0.0.0.0:15090")
    timeouts = _timeouts(ck, top.get("timeouts"))
    datapath = _datapath(ck, top.get("datapath"), colors)
    baggage_key = _baggage(ck, top.get("baggage"))
    capture = _capture(ck, top.get("capture"), mark_mask)

    if ck.issues:
        raise PolicyError(source, ck.issues)
    return Policy(
        version=version,
        header=header,
        default_color=default_color,
        mark_mask=mark_mask,
        colors=colors,
        inbound=inbound,
        outbound_listen=outbound_listen,
        admin_listen=admin_listen,
        timeouts=timeouts,
        datapath=datapath,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        source=source,
        routes=routes,
        cluster_domain=cluster_domain,
        baggage_key=baggage_key,
        capture=capture,
    )


def default_policy() -> Policy:
    return parse_policy(DEFAULT_POLICY_TEXT, "<default>")


def check_pod_color(policy: Policy, color: str) -> str | None:
    """Why ``color`` cannot be this pod's color, or None when it can."""
    if not COLOR_NAME_RE.match(color):
        return f"pod color '{color}' is not a valid color name ([a-z0-9][a-z0-9-]{{0,31}})"
    if color not in policy.colors:
        return (
            f"pod color '{color}' (TRAFFIC_COLOR) is not defined under colors "
            f"(defined: {', '.join(policy.colors)})"
        )
    return None


def _colors(ck: _Checker, entry: Any, mark_mask: int) -> dict[str, Color]:
    if entry is None:
        return dict(default_policy().colors)
    knode, vnode = entry
    items = ck.mapping(vnode, "colors", set())
    if not items and not ck.issues:
        ck.err(knode, "colors: at least one color is required")
    ck.declared_colors.update(items)
    colors: dict[str, Color] = {}
    seen_marks: dict[int, str] = {}
    for cid, (name, (cknode, cvnode)) in enumerate(items.items(), start=1):
        where = f"colors.{name}"
        if not COLOR_NAME_RE.match(name):
            ck.err(
                cknode,
                f"{where}: color name '{name}' is invalid "
                "(lower-case letters, digits and '-', at most 32, not starting with '-')",
            )
            continue
        if cid > MAX_COLORS:
            ck.err(cknode, f"{where}: at most {MAX_COLORS} colors are supported")
            continue
        fields = ck.mapping(cvnode, where, {"mark", "priority", "dscp"})
        if "mark" not in fields:
            if isinstance(cvnode, yaml.MappingNode):
                ck.err(cvnode, f"{where}: 'mark' is required")
            continue
        mnode = fields["mark"][1]
        mark = ck.integer(mnode, f"{where}.mark", 1, 0xFFFFFFFF)
        if mark is None:
            continue
        if mark & ~mark_mask:
            ck.err(mnode, f"{where}.mark: {mark:#x} has bits outside mark_mask {mark_mask:#x}")
            continue
        if mark in seen_marks:
            ck.err(
                mnode, f"{where}.mark: duplicate mark {mark:#x} (also used by '{seen_marks[mark]}')"
            )
            continue
        seen_marks[mark] = name
        priority = (
            ck.integer(fields["priority"][1], f"{where}.priority", 0, 0xFFFFFFFF)
            if "priority" in fields
            else None
        )
        dscp = ck.integer(fields["dscp"][1], f"{where}.dscp", 0, 63) if "dscp" in fields else None
        colors[name] = Color(name=name, id=cid, mark=mark, priority=priority, dscp=dscp)
    return colors


def _listen_section(ck: _Checker, entry: Any, what: str, default: str) -> Address:
    fallback = parse_address(default)
    assert fallback is not None
    if entry is None:
        return fallback
    fields = ck.mapping(entry[1], what, {"listen"})
    if "listen" not in fields:
        return fallback
    return ck.address(fields["listen"][1], f"{what}.listen") or fallback


def _outbound(
    ck: _Checker, entry: Any, colors: dict[str, Color], default_color: str
) -> tuple[Address, tuple[LaneRoute, ...], str]:
    """``outbound``: listen address, lane routes and the cluster domain their hosts use."""
    listen = parse_address("127.0.0.1:15001")
    assert listen is not None
    if entry is None:
        return listen, (), "cluster.local"
    fields = ck.mapping(entry[1], "outbound", {"listen", "routes", "cluster_domain"})
    if "listen" in fields:
        listen = ck.address(fields["listen"][1], "outbound.listen") or listen
    domain = "cluster.local"
    if "cluster_domain" in fields:
        node = fields["cluster_domain"][1]
        text = ck.string(node, "outbound.cluster_domain")
        if text is not None and DNS_NAME_RE.match(text.lower().rstrip(".")):
            domain = text.lower().rstrip(".")
        elif text is not None:
            ck.err(node, f"outbound.cluster_domain: '{text}' is not a DNS domain")
    routes: list[LaneRoute] = []
    seen: dict[str, int] = {}
    if "routes" in fields:
        for i, node in enumerate(ck.sequence(fields["routes"][1], "outbound.routes")):
            route = _lane_route(ck, node, f"outbound.routes[{i}]", colors, default_color)
            if route is None:
                continue
            if route.host in seen:
                ck.err(
                    node,
                    f"outbound.routes[{i}].host: '{route.host}' already has a route "
                    f"(line {seen[route.host]})",
                )
                continue
            seen[route.host] = route.line
            routes.append(route)
    return listen, tuple(routes), domain


def _lane_route(
    ck: _Checker, node: yaml.Node, where: str, colors: dict[str, Color], default_color: str
) -> LaneRoute | None:
    fields = ck.mapping(node, where, {"host", "lanes", "fallback"})
    if "host" not in fields or "lanes" not in fields:
        if isinstance(node, yaml.MappingNode):
            ck.err(node, f"{where}: a route needs 'host' and 'lanes'")
        return None
    host = ck.string(fields["host"][1], f"{where}.host")
    if host is not None:
        host = host.lower().rstrip(".")
        if not DNS_NAME_RE.match(host) or ":" in host:
            ck.err(fields["host"][1], f"{where}.host: '{host}' is not a service name (no port)")
            host = None
    fallback = "stable"
    if "fallback" in fields:
        value = ck.string(fields["fallback"][1], f"{where}.fallback")
        if value is not None and value not in FALLBACKS:
            ck.err(fields["fallback"][1], f"{where}.fallback: '{value}' must be stable or fail")
        elif value is not None:
            fallback = value
    lanes: dict[str, Address] = {}
    for name, (knode, vnode) in ck.mapping(fields["lanes"][1], f"{where}.lanes", set()).items():
        color = _known_color(ck, knode, f"{where}.lanes", colors)
        if color is None:
            continue
        if color == default_color:
            ck.err(
                knode,
                f"{where}.lanes.{name}: the default color '{default_color}' never enters a lane",
            )
            continue
        text = ck.string(vnode, f"{where}.lanes.{name}")
        lane = parse_lane(text) if text is not None else None
        if lane is None:
            if text is not None:
                ck.err(vnode, f"{where}.lanes.{name}: '{text}' is not HOST or HOST:PORT")
            continue
        lanes[color] = lane
    if host is None:
        return None
    return LaneRoute(node.start_mark.line + 1, host, lanes, fallback)


def parse_lane(text: str) -> Address | None:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> Address (port 0: the request's)."""
    text = text.strip().lower()
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return None
        port = int(rest[1:]) if rest else 0
        return Address(inner, port) if port < 65536 else None
    host, sep, port_text = text.partition(":")
    if sep and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        return None
    host = host.rstrip(".")
    if not DNS_NAME_RE.match(host):
        return None
    return Address(host, int(port_text) if sep else 0)


def _baggage(ck: _Checker, entry: Any) -> str | None:
    """``baggage.key``: the member carrying the color; an absent section turns baggage off."""
    if entry is None:
        return None
    fields = ck.mapping(entry[1], "baggage", {"key"})
    if "key" not in fields:
        if isinstance(entry[1], yaml.MappingNode):
            ck.err(entry[1], "baggage: 'key' is required (the member that carries the color)")
        return None
    key = ck.string(fields["key"][1], "baggage.key")
    if key is not None and not COOKIE_NAME_RE.match(key):
        ck.err(fields["key"][1], f"baggage.key: '{key}' is not a token (RFC 9110)")
        return None
    return key


def _timeouts(ck: _Checker, entry: Any) -> Timeouts:
    if entry is None:
        return Timeouts()
    names = set(Timeouts.__dataclass_fields__)
    fields = ck.mapping(entry[1], "timeouts", names)
    values = {}
    for key, (_, vnode) in fields.items():
        value = ck.number(vnode, f"timeouts.{key}")
        if value is not None:
            values[key] = value
    return Timeouts(**values)


def _inbound(ck: _Checker, entry: Any, colors: dict[str, Color]) -> Inbound:
    allowed = {"listen", "app", "trust_header", "trusted_sources", "rules"}
    fields = ck.mapping(entry[1], "inbound", allowed) if entry is not None else {}
    listen = parse_address("0.0.0.0:15006")
    app = parse_address("127.0.0.1:8080")
    assert listen is not None and app is not None
    if "listen" in fields:
        listen = ck.address(fields["listen"][1], "inbound.listen") or listen
    if "app" in fields:
        app = ck.address(fields["app"][1], "inbound.app", listen=False) or app
    trust = True
    if "trust_header" in fields:
        value = ck.boolean(fields["trust_header"][1], "inbound.trust_header")
        trust = True if value is None else value
    sources: tuple = ()
    if "trusted_sources" in fields:
        sources = _cidrs(ck, fields["trusted_sources"][1], "inbound.trusted_sources")
    rules = []
    if "rules" in fields:
        for i, node in enumerate(ck.sequence(fields["rules"][1], "inbound.rules")):
            rule = _rule(ck, node, f"inbound.rules[{i}]", colors)
            if rule is not None:
                rules.append(rule)
    return Inbound(listen, app, trust, sources, tuple(rules))


def _name_value(
    ck: _Checker, node: yaml.Node, where: str, name_re: re.Pattern[str], lower: bool
) -> tuple[str, str] | None:
    fields = ck.mapping(node, where, {"name", "value"})
    if set(fields) != {"name", "value"}:
        if isinstance(node, yaml.MappingNode):
            ck.err(node, f"{where}: needs both 'name' and 'value'")
        return None
    name = ck.string(fields["name"][1], f"{where}.name")
    value = ck.scalar(fields["value"][1], f"{where}.value")
    if name is None or value is None:
        return None
    if lower:
        name = name.lower()
    if not name_re.match(name):
        ck.err(fields["name"][1], f"{where}.name: '{name}' is not a valid name")
        return None
    return name, str(value)


def _rule(ck: _Checker, node: yaml.Node, where: str, colors: dict[str, Color]) -> Rule | None:
    fields = ck.mapping(node, where, {"match", "color", "split", "sticky_key"})
    line = node.start_mark.line + 1
    if "split" in fields:
        if "match" in fields or "color" in fields:
            ck.err(
                node,
                f"{where}: a split rule takes 'split' and 'sticky_key', not 'match' or 'color'",
            )
            return None
        return _split_rule(ck, node, fields, where, colors, line)
    if "match" not in fields or "color" not in fields:
        if isinstance(node, yaml.MappingNode):
            ck.err(node, f"{where}: a rule needs 'match' and 'color', or 'split' and 'sticky_key'")
        return None
    if "sticky_key" in fields:
        ck.err(fields["sticky_key"][0], f"{where}: 'sticky_key' belongs to a split rule")
    color = _known_color(ck, fields["color"][1], f"{where}.color", colors)
    mfields = ck.mapping(fields["match"][1], f"{where}.match", {"header", "cookie"})
    if not mfields:
        if isinstance(fields["match"][1], yaml.MappingNode):
            ck.err(fields["match"][1], f"{where}.match: needs 'header' or 'cookie'")
        return None
    header = cookie = None
    if "header" in mfields:
        header = _name_value(
            ck, mfields["header"][1], f"{where}.match.header", HEADER_NAME_RE, lower=True
        )
    if "cookie" in mfields:
        cookie = _name_value(
            ck, mfields["cookie"][1], f"{where}.match.cookie", COOKIE_NAME_RE, lower=False
        )
    if color is None or (header is None and cookie is None):
        return None
    return Rule(line=line, color=color, match=Match(header=header, cookie=cookie))


def _split_rule(
    ck: _Checker, node: yaml.Node, fields: dict, where: str, colors: dict[str, Color], line: int
) -> Rule | None:
    shares = ck.mapping(fields["split"][1], f"{where}.split", set())
    split: list[tuple[str, int]] = []
    total = 0
    for name, (knode, vnode) in shares.items():
        known = _known_color(ck, knode, f"{where}.split", colors)
        pct = ck.integer(vnode, f"{where}.split.{name}", 0, 100)
        if known is None or pct is None:
            continue
        split.append((name, pct))
        total += pct
    if total > 100:
        ck.err(fields["split"][1], f"{where}.split: percents add up to {total}, more than 100")
    if "sticky_key" not in fields:
        ck.err(node, f"{where}: a split needs 'sticky_key' (header:NAME or cookie:NAME)")
        return None
    knode = fields["sticky_key"][1]
    text = ck.string(knode, f"{where}.sticky_key")
    if text is None:
        return None
    source, _, name = text.partition(":")
    if source == "header":
        name = name.lower()
    if source not in ("header", "cookie") or not (
        HEADER_NAME_RE if source == "header" else COOKIE_NAME_RE
    ).match(name):
        ck.err(knode, f"{where}.sticky_key: '{text}' must be header:NAME or cookie:NAME")
        return None
    return Rule(line=line, split=tuple(split), sticky_key=StickyKey(source, name))


def _known_color(ck: _Checker, node: yaml.Node, where: str, colors: dict[str, Color]) -> str | None:
    name = ck.string(node, where)
    if name is None:
        return None
    if not COLOR_NAME_RE.match(name):
        ck.err(node, f"{where}: '{name}' is not a valid color name")
        return None
    if colors and name not in colors:
        if name not in ck.declared_colors:
            ck.err(node, f"{where}: color '{name}' is not defined under colors")
        return None
    return name


def _datapath(ck: _Checker, entry: Any, colors: dict[str, Color]) -> Datapath:
    if entry is None:
        return Datapath()
    allowed = {"enabled", "required", "flow_table_size", "attach", "routing"}
    fields = ck.mapping(entry[1], "datapath", allowed)
    enabled = required = False
    if "enabled" in fields:
        enabled = bool(ck.boolean(fields["enabled"][1], "datapath.enabled"))
    if "required" in fields:
        required = bool(ck.boolean(fields["required"][1], "datapath.required"))
    size = DEFAULT_FLOW_TABLE_SIZE
    if "flow_table_size" in fields:
        size = (
            ck.integer(fields["flow_table_size"][1], "datapath.flow_table_size", 16, 1 << 24)
            or size
        )
    attach = []
    if "attach" in fields:
        for i, node in enumerate(ck.sequence(fields["attach"][1], "datapath.attach")):
            where = f"datapath.attach[{i}]"
            af = ck.mapping(node, where, {"interface", "direction", "netns"})
            if "interface" not in af or "direction" not in af:
                if isinstance(node, yaml.MappingNode):
                    ck.err(node, f"{where}: needs 'interface' and 'direction'")
                continue
            ifname = ck.string(af["interface"][1], f"{where}.interface")
            direction = ck.string(af["direction"][1], f"{where}.direction")
            netns = ck.string(af["netns"][1], f"{where}.netns") if "netns" in af else None
            if ifname is not None and not re.fullmatch(r"[^\s/:]{1,15}", ifname):
                ck.err(
                    af["interface"][1],
                    f"{where}.interface: '{ifname}' is not an "
                    "interface name (1-15 characters, no '/', ':' or spaces)",
                )
                continue
            if direction not in ("ingress", "egress"):
                ck.err(
                    af["direction"][1],
                    f"{where}.direction: '{direction}' must be ingress or egress",
                )
                continue
            if ifname is not None:
                attach.append(AttachPoint(ifname, direction, netns))
    routing = Routing()
    if "routing" in fields:
        routing = _routing(ck, fields["routing"][1], colors)
    return Datapath(enabled, required, size, tuple(attach), routing)


def _routing(ck: _Checker, node: yaml.Node, colors: dict[str, Color]) -> Routing:
    fields = ck.mapping(node, "datapath.routing", {"netns", "rule_priority", "colors"})
    netns = ck.string(fields["netns"][1], "datapath.routing.netns") if "netns" in fields else None
    prio = DEFAULT_RULE_PRIORITY
    if "rule_priority" in fields:
        prio = (
            ck.integer(fields["rule_priority"][1], "datapath.routing.rule_priority", 1, 32000)
            or prio
        )
    out: dict[str, ColorRouting] = {}
    tables: dict[int, str] = {}
    if "colors" in fields:
        for name, (knode, vnode) in ck.mapping(
            fields["colors"][1], "datapath.routing.colors", set()
        ).items():
            where = f"datapath.routing.colors.{name}"
            if _known_color(ck, knode, where, colors) is None:
                continue
            cf = ck.mapping(vnode, where, {"table", "routes"})
            if "table" not in cf:
                if isinstance(vnode, yaml.MappingNode):
                    ck.err(vnode, f"{where}: 'table' is required")
                continue
            table = ck.integer(cf["table"][1], f"{where}.table", 1, 0xFFFFFFFF)
            if table is None:
                continue
            if table in RESERVED_TABLES:
                ck.err(
                    cf["table"][1],
                    f"{where}.table: {table} is reserved "
                    "(0 unspec, 253 default, 254 main, 255 local)",
                )
                continue
            if table in tables:
                ck.err(
                    cf["table"][1],
                    f"{where}.table: table {table} is already used by '{tables[table]}'",
                )
                continue
            tables[table] = name
            routes = []
            for j, rnode in enumerate(
                ck.sequence(cf["routes"][1], f"{where}.routes") if "routes" in cf else []
            ):
                route = _route(ck, rnode, f"{where}.routes[{j}]")
                if route is not None:
                    routes.append(route)
            out[name] = ColorRouting(table, tuple(routes))
    return Routing(netns, prio, out)


def _route(ck: _Checker, node: yaml.Node, where: str) -> Route | None:
    rf = ck.mapping(node, where, {"dst", "via", "dev"})
    if "dst" not in rf:
        if isinstance(node, yaml.MappingNode):
            ck.err(node, f"{where}: 'dst' is required")
        return None
    if "via" not in rf and "dev" not in rf:
        ck.err(node, f"{where}: needs 'via' or 'dev'")
        return None
    text = ck.string(rf["dst"][1], f"{where}.dst")
    if text is None:
        return None
    try:
        dst = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        ck.err(rf["dst"][1], f"{where}.dst: '{text}' is not a network ({exc})")
        return None
    via = None
    if "via" in rf:
        vtext = ck.string(rf["via"][1], f"{where}.via")
        if vtext is None:
            return None
        try:
            via = ipaddress.ip_address(vtext)
        except ValueError:
            ck.err(rf["via"][1], f"{where}.via: '{vtext}' is not an IP address")
            return None
        if via.version != dst.version:
            ck.err(
                rf["via"][1],
                f"{where}.via: IPv{via.version} gateway for an IPv{dst.version} destination",
            )
            return None
    dev = ck.string(rf["dev"][1], f"{where}.dev") if "dev" in rf else None
    return Route(dst, via, dev)


def _capture(ck: _Checker, entry: Any, mark_mask: int) -> Capture:
    if entry is None:
        return Capture()
    allowed = {
        "enabled",
        "owner_uid",
        "own_mark",
        "detect_timeout",
        "opaque_ports",
        "outbound",
        "inbound",
    }
    fields = ck.mapping(entry[1], "capture", allowed)
    values: dict[str, Any] = {}
    if "enabled" in fields:
        values["enabled"] = bool(ck.boolean(fields["enabled"][1], "capture.enabled"))
    if "owner_uid" in fields:
        uid = ck.integer(fields["owner_uid"][1], "capture.owner_uid", 1, 0xFFFFFFFE)
        if uid is not None:
            values["owner_uid"] = uid
    if "own_mark" in fields:
        mnode = fields["own_mark"][1]
        mark = ck.integer(mnode, "capture.own_mark", 1, 0xFFFFFFFF)
        if mark is not None and mark & mark_mask:
            ck.err(
                mnode,
                f"capture.own_mark: {mark:#x} shares bits with mark_mask {mark_mask:#x} "
                "(the colors' marks)",
            )
        elif mark is not None:
            values["own_mark"] = mark
    if "own_mark" not in fields and values.get("enabled") and DEFAULT_OWN_MARK & mark_mask:
        ck.err(
            entry[0],
            f"capture: mark_mask {mark_mask:#x} covers the default own_mark "
            f"{DEFAULT_OWN_MARK:#x}; set capture.own_mark to bits outside it",
        )
    if "detect_timeout" in fields:
        t = ck.number(fields["detect_timeout"][1], "capture.detect_timeout")
        if t is not None:
            values["detect_timeout"] = t
    if "opaque_ports" in fields:
        values["opaque_ports"] = _ports(ck, fields["opaque_ports"][1], "capture.opaque_ports")
    if "outbound" in fields:
        of = ck.mapping(
            fields["outbound"][1],
            "capture.outbound",
            {"exclude_ports", "include_cidrs", "exclude_cidrs"},
        )
        out: dict[str, Any] = {}
        if "exclude_ports" in of:
            out["exclude_ports"] = _ports(
                ck, of["exclude_ports"][1], "capture.outbound.exclude_ports"
            )
        for key in ("include_cidrs", "exclude_cidrs"):
            if key in of:
                out[key] = _cidrs(ck, of[key][1], f"capture.outbound.{key}")
        values["outbound"] = CaptureOutbound(**out)
    if "inbound" in fields:
        inf = ck.mapping(fields["inbound"][1], "capture.inbound", {"exclude_ports"})
        ports = (
            _ports(ck, inf["exclude_ports"][1], "capture.inbound.exclude_ports")
            if "exclude_ports" in inf
            else ()
        )
        values["inbound"] = CaptureInbound(ports)
    return Capture(**values)


def _ports(ck: _Checker, node: yaml.Node, where: str) -> tuple[int, ...]:
    ports: list[int] = []
    for item in ck.sequence(node, where):
        port = ck.integer(item, f"{where}[]", 1, 65535)
        if port is not None and port not in ports:
            ports.append(port)
    return tuple(ports)


def _cidrs(
    ck: _Checker, node: yaml.Node, where: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in ck.sequence(node, where):
        text = ck.string(item, f"{where}[]")
        if text is None:
            continue
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            ck.err(item, f"{where}: '{text}' is not a CIDR")
    return tuple(nets)
