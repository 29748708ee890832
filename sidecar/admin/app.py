"""Admin plane on aiohttp: probes, metrics, status and the route debugger.

It shares the proxy's event loop but none of its hot path: aiohttp's cost is
fine here because these endpoints are hit a few times a minute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.admin.access import path_open, peer_allowed
from sidecar.admin.merge import APP_METRICS_ENV, AppMetrics, check_target, merge
from sidecar.errors import DatapathError
from sidecar.policy import Address, parse_address
from sidecar.proxy.lanes import is_ip

if TYPE_CHECKING:
    from sidecar.node import NodeAgent
    from sidecar.runtime import Sidecar

log = logging.getLogger(__name__)


class AdminServer:
    """``/healthz`` ``/readyz`` ``/metrics`` ``/status`` ``/debug/route`` ``/quitquitquit``.

    The last three answer loopback and ``admin.trusted_sources`` only (see ``access``).
    """

    def __init__(self, sidecar: Sidecar | NodeAgent) -> None:
        self.sidecar = sidecar
        self.app = web.Application(middlewares=[self._gate])
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/status", self.status),
                web.get("/debug/route", self.debug_route),
                web.post("/quitquitquit", self.quitquitquit),
            ]
        )
        self.app_metrics: AppMetrics | None = None
        url = os.environ.get(APP_METRICS_ENV, "")
        if url:
            problem = check_target(url)
            if problem:
                log.warning("metrics merging off: %s", problem)
            else:
                self.app_metrics = AppMetrics(url, sidecar.metrics.registry)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, listen: Address) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.address = sock.getsockname()[:2]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if path_open(request.path) or peer_allowed(
            request.remote, self.sidecar.policy.admin_trusted_sources
        ):
            return await handler(request)
        return web.Response(
            status=403,
            text=f"{request.path} answers loopback only (see admin.trusted_sources)\n",
        )

    async def healthz(self, _: web.Request) -> web.Response:
        """The process is alive and its loop answers; nothing else."""
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        ready, why = self.sidecar.readiness()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def metrics(self, _: web.Request) -> web.Response:
        # Kernel counters are read from the per-CPU map here, at scrape time.
        app = await self.app_metrics.fetch() if self.app_metrics is not None else b""
        body = await asyncio.to_thread(generate_latest, self.sidecar.metrics.registry)
        if app:
            body = merge(body, app)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def quitquitquit(self, _: web.Request) -> web.Response:
        """Drain and stop, for Jobs whose app has finished (no accept period: nobody is left)."""
        self.sidecar.request_stop(skip_drain_accept=True)
        return web.Response(text="stopping\n")

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.sidecar.status))

    async def debug_route(self, request: web.Request) -> web.Response:
        """Which way would a color's flow to ``dst`` go: mark, rule, table, ``ip route get``;
        with ``host`` (``NAME[:PORT]``), which destination a request of that color gets."""
        color = request.query.get("color", "")
        dst = request.query.get("dst", "")
        policy = self.sidecar.policy
        if color not in policy.colors:
            return web.json_response(
                {"error": f"unknown color '{color}'", "colors": list(policy.colors)}, status=400
            )
        if "host" in request.query:
            return self._lane_route(color, request.query["host"], dst)
        try:
            ipaddress.ip_address(dst)
        except ValueError:
            return web.json_response({"error": f"dst '{dst}' is not an IP address"}, status=400)
        dp = self.sidecar.datapath
        if dp is None:
            return web.json_response(
                {
                    "error": "kernel data path not attached",
                    "reason": self.sidecar.dp_state.error or "datapath.enabled is false",
                },
                status=409,
            )
        try:
            answer = await asyncio.to_thread(dp.route_debug, color, dst)
        except DatapathError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return web.json_response(answer)

    def _lane_route(self, color: str, host: str, dst: str = "") -> web.Response:
        """The lane decision for a request of ``color`` (carried by it) to ``host``.

        With ``dst`` (``IP:PORT``, ``[IPv6]:PORT``), as for a captured request: the
        route is matched on ``host``'s name at ``dst``'s port, and ``dst``, the
        destination the app dialled, is where every choice but a lane's goes and where
        an empty lane falls back (``host``'s port plays no part, as in the proxy).
        """
        name, sep, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
        if not sep:
            name, port = host, "80"
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            return web.json_response({"error": f"host '{host}' is not NAME[:PORT]"}, status=400)
        original = None
        if dst:
            addr = parse_address(dst)
            if addr is None or not is_ip(addr.host):
                text = f"dst '{dst}' is not IP:PORT or [IPv6]:PORT (the captured destination)"
                return web.json_response({"error": text}, status=400)
            original, port = (addr.host, addr.port), str(addr.port)
        lanes = self.sidecar.ctx.lanes
        if lanes is None:
            destination = dst or f"{name}:{port}"
            return web.json_response(
                {
                    "color": color,
                    "destination": destination,
                    "why": "no-route",
                    "original": destination,
                }
            )
        return web.json_response(lanes.describe(color, name.strip("[]"), int(port), original))
