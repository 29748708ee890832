"""Mutating admission webhook: AdmissionReview v1 in, JSONPatch out.

The pod mutation is :func:`sidecar.inject.mutation.inject_pod`, the same code
``traffic-color inject`` runs; this module only speaks the AdmissionReview
envelope (:func:`review_response`, pure) and serves it over TLS with aiohttp.

The serving certificate is re-read when its files change, because cert-manager
and the chart's Secret rotate it in place (a Secret volume swaps a symlink) and
a webhook that needs a restart to pick up a renewed certificate fails the day
the old one expires.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from sidecar import __version__
from sidecar.inject.mutation import AnnotationError, InjectConfig, inject_pod, json_patch

log = logging.getLogger(__name__)

ADMISSION_API = "admission.k8s.io/v1"
RELOAD_ENV = "TRAFFIC_COLOR_CERT_RELOAD_SECONDS"
MAX_BODY = 4 * 1024 * 1024  # the API server sends at most ~3 MiB objects
CONFIG_KEY = web.AppKey("config", InjectConfig)
COUNTER_KEY = web.AppKey("admissions", Counter)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


class ReviewError(ValueError):
    """The request is not an AdmissionReview we can answer (HTTP 400)."""


def review_response(review: Any, config: InjectConfig) -> tuple[dict[str, Any], str]:
    """Answer one AdmissionReview; return ``(response review, outcome)``.

    Outcome is ``injected``, ``skipped``, ``denied`` or ``error``. A bug in the
    mutation lets the pod through unmodified, with a warning: this webhook adds a
    sidecar and must not stop a namespace on its own fault. The one veto is a
    traffic-color.io annotation the pod sets and that cannot be honoured (a
    resource quantity, a port, a CIDR): starting that pod with defaults would
    hide the mistake, so it is refused with the annotation and the reason.
    """
    if not isinstance(review, Mapping) or review.get("kind") != "AdmissionReview":
        raise ReviewError("expected an AdmissionReview object")
    if review.get("apiVersion") != ADMISSION_API:
        raise ReviewError(
            f"unsupported apiVersion {review.get('apiVersion')!r} "
            f"(this webhook speaks {ADMISSION_API})"
        )
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ReviewError("AdmissionReview without request.uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    outcome = "skipped"
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object")
    if kind == "Pod" and request.get("operation") == "CREATE" and isinstance(pod, Mapping):
        meta = pod.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        where = f"{request.get('namespace')}/{meta.get('name') or meta.get('generateName')}"
        try:
            new_pod, reason = inject_pod(pod, config)
        except AnnotationError as exc:
            log.info("pod %s: refused: %s", where, exc)
            response["allowed"] = False
            response["status"] = {
                "code": 400,
                "reason": "BadRequest",
                "message": f"traffic-color: {exc}",
            }
            outcome = "denied"
        except Exception as exc:  # never block a pod on our own bug
            log.exception("pod %s: injection failed", where)
            response["warnings"] = [f"traffic-color: sidecar not injected: {exc}"]
            outcome = "error"
        else:
            if reason is None:
                patch = json_patch(pod, new_pod)
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                outcome = "injected"
            log.info("pod %s: %s", where, reason or "injected")
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}, outcome


# ---------------------------------------------------------------------- HTTP


async def _mutate(request: web.Request) -> web.Response:
    try:
        review = await request.json()
        body, outcome = review_response(review, request.app[CONFIG_KEY])
    except (ValueError, ReviewError) as exc:  # JSONDecodeError is a ValueError
        request.app[COUNTER_KEY].labels("invalid").inc()
        return web.json_response({"error": str(exc)}, status=400)
    request.app[COUNTER_KEY].labels(outcome).inc()
    return web.json_response(body)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(config: InjectConfig) -> web.Application:
    """The webhook's routes: ``POST /mutate``, ``GET /healthz``, ``GET /metrics``."""
    app = web.Application(client_max_size=MAX_BODY)
    registry = CollectorRegistry()
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = registry
    app[COUNTER_KEY] = Counter(
        "traffic_color_webhook_admissions",
        "AdmissionReviews answered, by outcome",
        ["outcome"],
        registry=registry,
    )
    # Pods whose status annotation names another config digest need a restart.
    Gauge(
        "traffic_color_webhook_config_info",
        "The injection settings this webhook applies (digest as in traffic-color.io/status)",
        ["version", "config"],
        registry=registry,
    ).labels(__version__, config.digest()).set(1)
    app.router.add_post("/mutate", _mutate)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


# ----------------------------------------------------------------------- TLS


class CertReloader:
    """Keeps one ``SSLContext`` serving the current certificate files.

    ``SSL_new`` copies the certificate from the context at each handshake, so
    loading a new chain into the live context affects new connections only. A
    new pair is first loaded into a scratch context: a half-written or
    mismatched pair is logged and the old certificate keeps serving.
    """

    def __init__(self, cert: str | Path, key: str | Path) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(self.cert, self.key)
        self._digest = self._read_digest()
        self.reloads = 0

    def _read_digest(self) -> str:
        digest = hashlib.sha256()
        for path in (self.cert, self.key):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate was loaded."""
        try:
            digest = self._read_digest()
            if digest == self._digest:
                return False
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return False
        self._digest = digest
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def cleanup_ctx(self, interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
        """An aiohttp cleanup context that polls every ``interval`` seconds."""

        async def _poll(app: web.Application) -> AsyncIterator[None]:
            async def loop() -> None:
                while True:
                    await asyncio.sleep(interval)
                    self.check()

            task = asyncio.get_running_loop().create_task(loop())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return _poll


def reload_interval(args: argparse.Namespace) -> float:
    """Flag, else ``TRAFFIC_COLOR_CERT_RELOAD_SECONDS`` (the chart sets it), else 10 s."""
    value = getattr(args, "cert_reload_interval", None)
    if value is None:
        value = float(os.environ.get(RELOAD_ENV, "10"))
    if value <= 0:
        raise ValueError(f"certificate reload interval must be positive, got {value}")
    return value


def run_webhook(args: argparse.Namespace) -> int:
    """Entry point of ``traffic-color webhook``; blocks until SIGTERM/SIGINT."""
    from sidecar.inject.cli import config_from_args

    try:
        config = config_from_args(args)
        interval = reload_interval(args)
        reloader = CertReloader(args.tls_cert, args.tls_key)
    except (OSError, ValueError, ssl.SSLError) as exc:
        log.error("webhook cannot start: %s", exc)
        return 2
    app = make_app(config)
    app.cleanup_ctx.append(reloader.cleanup_ctx(interval))
    host = getattr(args, "host", None) or "0.0.0.0"
    log.info(
        "webhook listening on https://%s:%d/mutate (sidecar image %s, config %s)",
        host,
        args.port,
        config.image,
        config.digest(),
    )
    web.run_app(
        app,
        host=host,
        port=args.port,
        ssl_context=reloader.context,
        print=None,
        shutdown_timeout=5.0,
        access_log=None,
    )
    return 0
