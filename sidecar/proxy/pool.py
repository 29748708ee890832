"""The keep-alive pool of upstream connections, kept per (color, host, port).

One pooled TCP connection only ever carries requests of one color, so the
kernel can route the whole flow by that color: the pool key starts with it,
and the flow hooks hear about each connection exactly once when it opens and
once when it closes, with the same 4-tuple.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sidecar.memtrim import give_back_free_memory
from sidecar.proxy.batch import WriteBatch
from sidecar.proxy.context import Key
from sidecar.proxy.http1.upstream import UpstreamConnection

if TYPE_CHECKING:
    from sidecar.policy import Policy
    from sidecar.proxy.context import ProxyContext
    from sidecar.proxy.opaque import Tunnel

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_IDLE_PER_KEY = 256  # idle connections kept per pool key; more are closed on release
# Idle connections per pool key that keep their transport when released; the rest,
# and any idle across a whole sweep, are parked (see ``Pool``).
HOT_IDLE_PER_KEY = 64
# Transports closed by parking or sweeping since the last sweep before that sweep gives
# their memory back to the kernel (see ``sidecar.memtrim``).
TRIM_AFTER_CLOSED = 256
_PARKED_EVENTS = select.EPOLLIN | select.EPOLLRDHUP  # data, FIN or RST: the upstream let go
_KEYS_CACHE = 4096  # distinct pool keys shared between connections before the cache starts over


class ParkedFlow:
    """An idle upstream flow without a transport: what reviving or closing it needs.

    Five slots instead of a connection's thirty and its transport, parser and
    buffers: the difference, times ten thousand idle flows, is the memory bar.
    """

    __slots__ = ("addrs", "fd", "hooks", "idle_since", "key")

    def __init__(self, conn: UpstreamConnection, fd: int) -> None:
        self.key = conn.key
        self.addrs = conn.addrs
        self.hooks = conn.hooks
        self.idle_since = conn.idle_since
        self.fd = fd


Flow = UpstreamConnection | ParkedFlow  # what ``Pool.open`` holds: one per open flow


class Pool:
    """Idle keep-alive connections per (color, host, port), and every open one.

    Idle connections sit in two tiers. Hot ones keep their transport and parser and
    serve the next request at once. The rest are parked: the socket stays open, so
    the flow and its 4-tuple (and its entry in the kernel's flow map) live on, but
    the transport is closed on a duplicate of its descriptor and the socket is
    watched by one epoll of our own that the loop reads. A parked connection costs
    a few hundred bytes instead of a few kilobytes (issue 5: 10k idle flows fit the
    memory bar); reviving it makes a new transport on the same socket (tens of
    microseconds, far less than a new TCP connection). A connection parks when more
    than ``HOT_IDLE_PER_KEY`` are idle for its key, or when it stayed idle across a
    whole sweep; data, FIN or RST on a parked socket closes it, as on an idle one.
    """

    def __init__(
        self, ctx: ProxyContext, loop: asyncio.AbstractEventLoop, batch: WriteBatch
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.batch = batch  # the proxy's writes and closes, in order (see ``batch.py``)
        self.idle: dict[Key, list[UpstreamConnection]] = {}  # hot, oldest first
        self.parked: dict[Key, dict[ParkedFlow, None]] = {}  # oldest first
        self.open: set[Flow] = set()
        self._parked_fds: dict[int, ParkedFlow] = {}
        self._epoll: select.epoll | None = None  # made with the first parked connection
        self.now = loop.time()  # advanced by the proxy's sweeper; stamps idle connections
        self.closed = False
        # 4-tuples told to the hooks before their connect finished -> (4-tuple, those hooks);
        # the connection adopts the tuple itself, so the hooks' records share it.
        self._registered: dict[tuple[tuple[str, int], tuple[str, int]], Any] = {}
        self._keys: dict[Key, Key] = {}  # one key tuple per upstream, shared by its connections
        self._remotes: dict[tuple[str, int], tuple[str, int]] = {}
        self._closed_since_trim = 0

    def take(self, key: Key) -> UpstreamConnection | None:
        """The most recently used idle connection for ``key`` (LIFO keeps few warm), or None."""
        try:
            stack = self.idle[key]  # no get(): see ``Downstream.on_header``
        except KeyError:
            return None
        while stack:
            conn = stack.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed:
            self.batch.close(conn.transport)  # type: ignore[arg-type]
            return
        key = conn.key
        try:
            stack = self.idle[key]
        except KeyError:
            stack = self.idle[key] = []
        parked = self.parked.get(key)  # absent for most keys: get(), not an index
        if len(stack) + (len(parked) if parked else 0) >= MAX_IDLE_PER_KEY:
            self.batch.close(conn.transport)  # type: ignore[arg-type]
            return
        conn.idle_since = self.now
        conn.data = b""  # the last read: not kept alive by an idle connection
        if len(stack) >= HOT_IDLE_PER_KEY:
            self.park(conn)
        else:
            stack.append(conn)

    async def connect(
        self,
        key: Key,
        tunnel: Tunnel | None = None,
        address: str | None = None,
        timeout: float | None = None,
    ) -> UpstreamConnection:
        """A revived parked connection for ``key``, else a new one.

        With ``tunnel`` (an opaque relay) always a new one, joined to the tunnel
        from its first byte. ``address`` (a lane's, looked up by the lane resolver
        cache) is connected to instead of the key's host, within ``timeout`` instead
        of ``timeouts.connect``. Raises TimeoutError or OSError when none can be made.
        """
        parked = self.parked.get(key) if tunnel is None else None
        while parked:
            conn = await self._revive(parked.popitem()[0])
            if conn is not None:
                return conn
        _, host, port = key
        host = address or host
        key = self._keys.setdefault(key, key)
        if len(self._keys) > _KEYS_CACHE:
            self._keys.clear()
        # A timeout scope, not ``wait_for``: no second task per connect (a burst of a
        # thousand requests opens a thousand at once).
        policy = self.ctx.colorer.policy
        dscp = color_dscp(policy, key[0])
        async with asyncio.timeout(timeout or self.ctx.timeouts.connect):
            if self.ctx.hooks is not None or self.ctx.own_mark or dscp is not None:
                conn = await self._connect_colored(key, host, tunnel, dscp)
            else:
                _, conn = await self.loop.create_connection(
                    lambda: self._new(key, tunnel), host, port
                )
        if self.ctx.colorer.policy is not policy:  # reloaded meanwhile: see ``set_dscp``
            changed = dscp_changes(policy, self.ctx.colorer.policy).get(key[0])
            if changed is not None:
                set_transport_dscp(conn.transport, changed)
        return conn

    def _new(self, key: Key, tunnel: Tunnel | None) -> UpstreamConnection:
        conn = UpstreamConnection(self, key)
        conn.tunnel = tunnel
        return conn

    async def _connect_colored(
        self, key: Key, host: str, tunnel: Tunnel | None, dscp: int | None
    ) -> UpstreamConnection:
        """Set the color's DSCP and register the flow before its SYN leaves, then connect.

        A router routes each packet by its mark, and a node by its DSCP, so an
        unmarked handshake would reach the main table's host and the marked rest
        of the flow another one. The DSCP (``IP_TOS`` / ``IPV6_TCLASS``, no
        privilege needed) crosses into the node, where the node agent reads it;
        it is a routing hint any process in the pod could set, not access control.
        The 4-tuple is known before connect() only when we bind first, to the
        source address the kernel would pick anyway. ``opened`` then only adopts
        the registration (each flow hears ``flow_open`` exactly once) and ``lost``
        removes it; a connect that fails is unregistered here.

        In capture mode the socket carries the sidecar's own mark (SO_MARK), which
        the capture rules never redirect: our own flows cannot loop back to us.
        """
        color, _, port = key
        hooks = self.ctx.hooks
        registered: list[tuple[tuple[str, int], tuple[str, int]]] = []

        def register(local: tuple, remote: tuple) -> None:
            flow = ((sys.intern(local[0]), local[1]), self.remote(remote))
            registered.append(flow)
            self._registered[flow] = (flow, hooks)
            _call_hook(hooks.flow_open, color, *flow)  # type: ignore[union-attr]

        def unregister() -> None:
            flow = registered.pop()
            if self._registered.pop(flow, None):
                _call_hook(hooks.flow_close, color, *flow)  # type: ignore[union-attr]

        async def transport(sock: socket.socket) -> UpstreamConnection:
            _, conn = await self.loop.create_connection(lambda: self._new(key, tunnel), sock=sock)
            return conn

        def check(conn: UpstreamConnection) -> None:
            if conn.addrs is None:  # reset between connect and the transport
                raise ConnectionResetError("closed by the upstream as soon as it was accepted")

        return await connect_flow(
            self.loop,
            host,
            port,
            transport,
            mark=self.ctx.own_mark,
            dscp=dscp,
            register=register if hooks is not None else None,
            unregister=unregister,
            check=check,
        )

    def remote(self, sockaddr: tuple) -> tuple[str, int]:
        """``(host, port)`` of an upstream's socket address: one tuple shared by its flows."""
        addr = (sockaddr[0], sockaddr[1])
        shared = self._remotes.get(addr)
        if shared is None:
            if len(self._remotes) >= _KEYS_CACHE:
                self._remotes.clear()
            shared = self._remotes[addr] = (sys.intern(addr[0]), addr[1])
        return shared

    # ------------------------------------------------------------ flow bookkeeping

    def opened(self, conn: UpstreamConnection) -> None:
        self.open.add(conn)
        color = conn.key[0]
        self.ctx.metrics.flow_opened(color)
        found = self._registered.pop(conn.addrs, None)  # type: ignore[arg-type]
        if found is not None:
            conn.addrs, conn.hooks = found  # registered before the SYN by _connect_colored
            return
        hooks = self.ctx.hooks
        if hooks is not None:
            _call_hook(hooks.flow_open, color, *conn.addrs)  # type: ignore[misc]
            conn.hooks = hooks  # told even if it failed: it may have half-recorded the flow

    def lost(self, conn: Flow) -> None:
        if conn not in self.open:
            return
        self.open.discard(conn)
        stack = self.idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)
        color = conn.key[0]
        self.ctx.metrics.flow_closed(color)
        hooks = conn.hooks
        if hooks is not None:
            conn.hooks = None
            _call_hook(hooks.flow_close, color, *conn.addrs)  # type: ignore[misc]

    def set_dscp(self, changes: dict[str, int]) -> int:
        """Give the open flows of each color in ``changes`` (``dscp_changes``) its new DS
        field: hot, parked, busy, tunnels and opaque relays alike. Setting it on a live
        socket changes the packets it sends from then on, so a reload needs no
        reconnect; a flow opened meanwhile is seen to by ``connect``. How many."""
        done = 0
        for flow in list(self.open):
            dscp = changes.get(flow.key[0])
            if dscp is None:
                continue
            fd = flow.fd if isinstance(flow, ParkedFlow) else flow.parked  # parked, parking
            if fd is None:
                done += set_transport_dscp(flow.transport, dscp)
                continue
            sock = socket.socket(fileno=fd)  # borrowed: detached, never closed here
            try:
                done += set_socket_dscp(sock, dscp)
            finally:
                sock.detach()
        return done

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for conn in self.open:
            out[conn.key[0]] = out.get(conn.key[0], 0) + 1
        return out

    # ------------------------------------------------------------ the parked tier

    def park(self, conn: UpstreamConnection) -> None:
        """Close ``conn``'s transport but not its socket; ``settle`` parks it once closed."""
        transport: asyncio.Transport = conn.transport  # type: ignore[assignment]
        try:
            conn.parked = os.dup(transport.get_extra_info("socket").fileno())
        except (OSError, AttributeError):
            pass  # no socket to keep (closing already): an ordinary close
        else:
            self._closed_since_trim += 1
        self.batch.close(transport)

    def settle(self, conn: UpstreamConnection) -> None:
        """The parking transport is gone: a ``ParkedFlow`` watches the socket it left."""
        flow = ParkedFlow(conn, conn.parked)  # type: ignore[arg-type]
        conn.parked = conn.transport = conn.flow = conn.parser = None
        self.open.discard(conn)
        self.open.add(flow)
        if self.closed:
            self._close_parked(flow)
            return
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
                self.loop.add_reader(self._epoll.fileno(), self._parked_events)
            self._epoll.register(flow.fd, _PARKED_EVENTS)
        except OSError:
            log.exception("cannot watch a parked upstream connection; closing it")
            self._close_parked(flow)
            return
        self._parked_fds[flow.fd] = flow
        parked = self.parked.get(flow.key)
        if parked is None:
            parked = self.parked[flow.key] = {}
        parked[flow] = None

    async def _revive(self, flow: ParkedFlow) -> UpstreamConnection | None:
        """A new connection object and transport on a parked flow's socket; None if gone."""
        self._unwatch(flow)
        conn = UpstreamConnection(self, flow.key)
        conn.addrs, conn.hooks, conn.idle_since = flow.addrs, flow.hooks, flow.idle_since
        conn.reused = True  # the upstream may have closed it just now: idempotent retry
        self.open.discard(flow)
        self.open.add(conn)
        sock = socket.socket(fileno=flow.fd)
        try:
            await self.loop.create_connection(lambda: conn, sock=sock)
        except OSError:
            sock.close()
            conn.closed = True
            self.lost(conn)
            return None
        if conn.closed or conn.transport.is_closing():  # type: ignore[union-attr]
            return None  # closed by the upstream meanwhile: its connection_lost tidies up
        return conn

    def _parked_events(self) -> None:
        """Data, FIN or RST on parked sockets: close those flows."""
        for fd, _ in self._epoll.poll(0):  # type: ignore[union-attr]
            flow = self._parked_fds.get(fd)
            if flow is not None:
                self._close_parked(flow)

    def _unwatch(self, flow: ParkedFlow) -> None:
        if self._parked_fds.pop(flow.fd, None) is not None:
            self._epoll.unregister(flow.fd)  # type: ignore[union-attr]
        parked = self.parked.get(flow.key)
        if parked:
            parked.pop(flow, None)

    def _close_parked(self, flow: ParkedFlow) -> None:
        self._unwatch(flow)
        os.close(flow.fd)
        self.lost(flow)

    # ------------------------------------------------------------ upkeep

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close connections idle for longer than ``idle_timeout``; park the long idle.

        Hot connections already idle at the previous sweep are parked: they are the
        long tail of a large pool, not the few that serve the next request.
        """
        before, self.now = self.now, now
        for stack in self.idle.values():
            while stack and now - stack[0].idle_since > idle_timeout:
                self.batch.close(stack.pop(0).transport)  # type: ignore[arg-type]
                self._closed_since_trim += 1
            old = 0
            while old < len(stack) and stack[old].idle_since < before:
                old += 1  # newer ones sit above
            if old:
                for conn in stack[:old]:
                    self.park(conn)
                del stack[:old]
        for parked in self.parked.values():
            expired = []
            for flow in parked:
                if now - flow.idle_since <= idle_timeout:
                    break  # newer ones follow
                expired.append(flow)
            for flow in expired:
                self._close_parked(flow)
        # An app may talk to many upstreams over its life: those with nothing idle leave
        # no empty entry behind.
        for table in (self.idle, self.parked):
            for key in [key for key, entries in table.items() if not entries]:
                del table[key]
        if self._closed_since_trim >= TRIM_AFTER_CLOSED:
            self._closed_since_trim = 0
            give_back_free_memory()

    def close_idle(self) -> None:
        for stack in self.idle.values():
            while stack:
                self.batch.close(stack.pop().transport)  # type: ignore[arg-type]
        for parked in self.parked.values():
            for flow in list(parked):
                self._close_parked(flow)

    def close_all(self) -> None:
        self.closed = True
        self.close_idle()
        for conn in list(self.open):
            if isinstance(conn, UpstreamConnection) and conn.transport is not None:
                self.batch.close(conn.transport)
        if self._epoll is not None:
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None


def _call_hook(method: Any, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
    """A raising hook is logged, never allowed to fail a request."""
    try:
        method(color, local, remote)
    except Exception:
        log.exception("%s hook failed for %s %s -> %s", method.__name__, color, local, remote)


def color_dscp(policy: Policy, color: str) -> int | None:
    """The DSCP a color's upstream sockets carry, or None when it has none. Pure."""
    c = policy.colors.get(color)
    return c.dscp if c is not None else None


def dscp_changes(old: Policy, new: Policy) -> dict[str, int]:
    """color -> the DSCP its open flows carry after a reload from ``old`` to ``new``, for
    each color whose DSCP changed; 0 (what a socket has by default) where it has none
    any more, the color itself gone included. Pure."""
    out: dict[str, int] = {}
    for color in (*old.colors, *(c for c in new.colors if c not in old.colors)):
        before, after = color_dscp(old, color), color_dscp(new, color)
        if before != after:
            out[color] = after or 0
    return out


def set_socket_dscp(sock: Any, dscp: int) -> bool:
    """Put ``dscp`` on an open socket (or a transport's socket object); False if it is gone."""
    try:
        sock.setsockopt(*tos_option(sock.family, dscp))
    except OSError:  # closed meanwhile
        return False
    return True


def set_transport_dscp(transport: asyncio.BaseTransport | None, dscp: int) -> bool:
    """``set_socket_dscp`` on a transport's socket; False when it has none (closing)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and set_socket_dscp(sock, dscp)


def tos_option(family: int, dscp: int) -> tuple[int, int, int]:
    """``setsockopt`` arguments that put ``dscp`` in the DS field (ECN bits left to TCP). Pure."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp << 2
    return socket.IPPROTO_IP, socket.IP_TOS, dscp << 2


async def connect_flow(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    transport: Callable[[socket.socket], Awaitable[T]],
    *,
    mark: int = 0,
    dscp: int | None = None,
    register: Callable[[tuple, tuple], None] | None = None,
    unregister: Callable[[], None] | None = None,
    check: Callable[[T], None] | None = None,
) -> T:
    """Connect one upstream flow the way both pools need it, trying each address in turn.

    The socket gets the sidecar's own mark (capture leaves it alone) and the color's
    DSCP before its SYN; with ``register``, it is bound first so that its 4-tuple is
    told (``register(local, remote)``) before the handshake, and a failed attempt is
    told ``unregister()``. ``transport(sock)`` makes the connection object, which owns
    the socket from then on (never closed here again); ``check`` may still refuse it,
    as a failed attempt. Raises the last OSError when no address could be reached.
    """
    try:  # an address literal needs no resolver thread
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, _, _, _, addr in infos:
        sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        registered = False
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            if dscp is not None:
                sock.setsockopt(*tos_option(family, dscp))
            if register is not None:
                sock.bind((_source_address(family, addr), 0))
                register(sock.getsockname(), addr)
                registered = True
            await loop.sock_connect(sock, addr)
            result = await transport(sock)
            sock = None  # the transport's now: it closes the descriptor, once
            if check is not None:
                check(result)
            return result
        except BaseException as exc:
            if registered and unregister is not None:
                unregister()
            if sock is not None:
                with contextlib.suppress(OSError):  # EBADF: closed under us already
                    sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
    raise error


def _source_address(family: int, addr: tuple) -> str:
    """The source address the kernel picks to reach ``addr`` (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)
        return probe.getsockname()[0]
