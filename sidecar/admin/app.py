"""Admin plane on aiohttp: probes, metrics, status and the route debugger.

It shares the proxy's event loop but none of its hot path: aiohttp's cost is
fine here because these endpoints are hit a few times a minute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.errors import DatapathError
from sidecar.policy import Address

if TYPE_CHECKING:
    from sidecar.node import NodeAgent
    from sidecar.runtime import Sidecar

log = logging.getLogger(__name__)


class AdminServer:
    """``/healthz`` ``/readyz`` ``/metrics`` ``/status`` ``/debug/route``."""

    def __init__(self, sidecar: Sidecar | NodeAgent) -> None:
        self.sidecar = sidecar
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/status", self.status),
                web.get("/debug/route", self.debug_route),
            ]
        )
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

    async def healthz(self, _: web.Request) -> web.Response:
        """The process is alive and its loop answers; nothing else."""
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        ready, why = self.sidecar.readiness()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def metrics(self, _: web.Request) -> web.Response:
        # Kernel counters are read from the per-CPU map here, at scrape time.
        body = await asyncio.to_thread(generate_latest, self.sidecar.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.sidecar.status))

    async def debug_route(self, request: web.Request) -> web.Response:
        """Which way would a color's flow to ``dst`` go: mark, rule, table, ``ip route get``."""
        color = request.query.get("color", "")
        dst = request.query.get("dst", "")
        policy = self.sidecar.policy
        if color not in policy.colors:
            return web.json_response(
                {"error": f"unknown color '{color}'", "colors": list(policy.colors)}, status=400
            )
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
