"""The admission webhook over real TLS: AdmissionReviews from an aiohttp client.

Each test makes its own CA and serving certificate, serves the webhook on a
loopback port and checks what the API server would check: the certificate
verifies against the CA bundle, the response answers the request's uid, and
the JSONPatch turns the pod into a valid pod with the sidecar.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar import __version__
from sidecar.admin.webhook import CertReloader, make_app, review_response
from sidecar.inject.mutation import InjectConfig
from tests.inject.k8s import apply_patch, schema_errors
from tests.inject.tls import Authority, make_ca, write_server_cert

CONFIG = InjectConfig(image="registry.example/traffic-color:test")
REPO = Path(__file__).resolve().parents[2]


def _pod(annotations: dict | None = None) -> dict:
    meta: dict = {
        "generateName": "web-7d9f-",
        "namespace": "shop",
        "labels": {"app": "web", "traffic-color.io/color": "canary"},
    }
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "web", "image": "example/web:1"}]},
    }


def _review(pod: dict, uid: str = "4b8e-uid", operation: str = "CREATE", kind: str = "Pod") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "object": pod,
            "dryRun": False,
        },
    }


def _client_context(ca: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.pem.decode())


class Served:
    def __init__(self, url: str, ca: Authority, reloader: CertReloader, tls_dir: Path) -> None:
        self.url, self.ca, self.reloader, self.tls_dir = url, ca, reloader, tls_dir

    async def post(self, body: object, ca: Authority | None = None) -> tuple[int, dict]:
        connector = aiohttp.TCPConnector(ssl=_client_context(ca or self.ca), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with session.post(
                f"{self.url}/mutate",
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                return resp.status, await resp.json(content_type=None)

    async def get(self, path: str, ca: Authority | None = None) -> tuple[int, str]:
        connector = aiohttp.TCPConnector(ssl=_client_context(ca or self.ca), force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            return resp.status, await resp.text()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    ca = make_ca()
    cert, key = write_server_cert(ca, tmp_path / "tls")
    reloader = CertReloader(cert, key)
    app = make_app(CONFIG)
    app.cleanup_ctx.append(reloader.cleanup_ctx(0.05))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloader.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"https://localhost:{port}", ca, reloader, tmp_path / "tls")
    finally:
        await runner.cleanup()


def _patched(pod: dict, response: dict) -> dict:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return apply_patch(pod, patch)


async def test_pod_is_injected_through_a_json_patch(served: Served) -> None:
    pod = _pod()
    status, body = await served.post(_review(pod, uid="abc-123"))
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "abc-123"
    assert response["allowed"] is True
    new = _patched(pod, response)
    names = [c["name"] for c in new["spec"]["containers"]]
    assert names == ["traffic-color", "web"]
    assert [c["name"] for c in new["spec"]["initContainers"]] == ["traffic-color-capture"]
    status = json.loads(new["metadata"]["annotations"]["traffic-color.io/status"])
    assert status["state"] == "injected" and status["config"] == CONFIG.digest()
    assert new["metadata"]["labels"]["traffic-color.io/color"] == "canary"
    assert schema_errors(new) == []


async def test_opted_out_and_already_injected_pods_get_no_patch(served: Served) -> None:
    status, body = await served.post(_review(_pod({"traffic-color.io/inject": "false"})))
    assert status == 200
    assert body["response"] == {"uid": "4b8e-uid", "allowed": True}
    pod = _pod()
    _, first = await served.post(_review(pod))
    injected = _patched(pod, first["response"])
    _, second = await served.post(_review(injected))
    assert "patch" not in second["response"]


@pytest.mark.parametrize("operation, kind", [("UPDATE", "Pod"), ("CREATE", "Deployment")])
async def test_only_pod_creation_is_mutated(served: Served, operation: str, kind: str) -> None:
    status, body = await served.post(_review(_pod(), operation=operation, kind=kind))
    assert status == 200
    assert body["response"] == {"uid": "4b8e-uid", "allowed": True}


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "Expecting"),
        (
            {
                "apiVersion": "admission.k8s.io/v1beta1",
                "kind": "AdmissionReview",
                "request": {"uid": "x"},
            },
            "unsupported apiVersion",
        ),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request.uid"),
        ([1, 2], "expected an AdmissionReview"),
    ],
)
async def test_malformed_reviews_are_400(served: Served, payload: object, reason: str) -> None:
    status, body = await served.post(payload)
    assert status == 400
    assert reason in body["error"]


async def test_metrics_count_outcomes(served: Served) -> None:
    await served.post(_review(_pod()))
    await served.post(_review(_pod({"traffic-color.io/inject": "false"})))
    await served.post(b"[")
    status, text = await served.get("/metrics")
    assert status == 200
    assert 'traffic_color_webhook_admissions_total{outcome="injected"} 1.0' in text
    assert 'traffic_color_webhook_admissions_total{outcome="skipped"} 1.0' in text
    assert 'traffic_color_webhook_admissions_total{outcome="invalid"} 1.0' in text


async def test_a_pod_with_a_bad_annotation_is_refused_with_the_reason(served: Served) -> None:
    pod = _pod({"traffic-color.io/exclude-outbound-ports": "5432,postgres"})
    status, body = await served.post(_review(pod))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "traffic-color: annotation traffic-color.io/exclude-outbound-ports: "
        "'5432,postgres' is not a list of TCP ports (1-65535): bad item 'postgres'"
    )
    _, text = await served.get("/metrics")
    assert 'traffic_color_webhook_admissions_total{outcome="denied"} 1.0' in text


async def test_metrics_name_the_settings_digest(served: Served) -> None:
    _, text = await served.get("/metrics")
    assert (
        "traffic_color_webhook_config_info"
        f'{{config="{CONFIG.digest()}",version="{__version__}"}} 1.0' in text
    )


async def test_certificate_must_verify_against_the_ca(served: Served) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await served.post(_review(_pod()), ca=make_ca("someone else"))


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_renewed_certificate_is_served_without_restart(served: Served) -> None:
    new_ca = make_ca("renewed CA")
    write_server_cert(new_ca, served.tls_dir)

    async def new_cert_served() -> bool:
        try:
            status, _ = await served.get("/healthz", ca=new_ca)
        except aiohttp.ClientConnectorCertificateError:
            return False
        return status == 200

    assert await _wait_for(new_cert_served), "renewed certificate not served within 5 s"
    assert served.reloader.reloads == 1
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await served.get("/healthz", ca=served.ca)


async def test_broken_certificate_files_keep_the_old_certificate(served: Served) -> None:
    (served.tls_dir / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    await asyncio.sleep(0.3)  # several poll periods
    assert served.reloader.reloads == 0
    status, _ = await served.get("/healthz")
    assert status == 200


def test_review_response_is_pure_and_allows_on_mutation_bugs() -> None:
    review = _review({"apiVersion": "v1", "kind": "Pod", "metadata": "not a mapping", "spec": {}})
    body, outcome = review_response(review, CONFIG)
    assert outcome == "error"
    assert body["response"]["allowed"] is True
    assert "patch" not in body["response"]
    assert body["response"]["warnings"][0].startswith("traffic-color: sidecar not injected")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_traffic_color_webhook_command_serves_tls(tmp_path: Path) -> None:
    """The console entry point, as the chart runs it, with a settings file."""
    ca = make_ca()
    cert, key = write_server_cert(ca, tmp_path)
    settings = tmp_path / "inject.json"
    settings.write_text(json.dumps({"image": "registry.example/tc:cli", "nativeSidecar": True}))
    port = _free_port()
    env = {**os.environ, "TRAFFIC_COLOR_CERT_RELOAD_SECONDS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "webhook",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--config",
            str(settings),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        served = Served(f"https://localhost:{port}", ca, None, tmp_path)  # type: ignore[arg-type]

        async def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode())  # type: ignore[union-attr]
            try:
                return (await served.get("/healthz"))[0] == 200
            except aiohttp.ClientConnectorError:
                return False

        assert await _wait_for(up, timeout=15), "webhook did not come up within 15 s"
        pod = _pod()
        status, body = await served.post(_review(pod))
        assert status == 200
        new = _patched(pod, body["response"])
        capture, sidecar = new["spec"]["initContainers"]
        assert capture["name"] == "traffic-color-capture"
        assert (sidecar["name"], sidecar["image"], sidecar["restartPolicy"]) == (
            "traffic-color",
            "registry.example/tc:cli",
            "Always",
        )
        assert schema_errors(new) == []
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
