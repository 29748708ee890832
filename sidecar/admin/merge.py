"""Metrics merging: the sidecar's ``/metrics`` also serves the app's own metrics.

A pod carries one set of ``prometheus.io/scrape|port|path`` annotations. When
injection points them at the sidecar (as Istio's metrics merging does), the
app's metrics would go unscraped, so the sidecar fetches them from the address
injection leaves in ``TRAFFIC_COLOR_APP_METRICS`` and appends them to its own.
The fetch is bounded in time and size, and an app that fails to answer costs
only its own series: the sidecar's are served all the same, and the failure is
counted in ``traffic_color_app_metrics_scrape_failures_total{reason}``.

``merge`` is pure (bytes in, bytes out); ``AppMetrics`` does the fetching.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

APP_METRICS_ENV = "TRAFFIC_COLOR_APP_METRICS"
FETCH_TIMEOUT = 5.0  # seconds; below Prometheus' default scrape timeout (10 s)
MAX_BYTES = 8 << 20  # an app's exposition larger than this is refused, not truncated
FAILURE_REASONS = ("connect", "timeout", "status", "too_large")
# Only the text format (0.0.4) is asked for: it concatenates with ours line by line.
ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"

_SAMPLE_SUFFIXES = (b"_total", b"_count", b"_sum", b"_bucket", b"_created", b"_info")
_NAME = re.compile(rb"[a-zA-Z_:][a-zA-Z0-9_:]*")


def check_target(url: str) -> str | None:
    """Why ``url`` cannot be the app's metrics address, or None when it can."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return f"{APP_METRICS_ENV}={url!r}: only http:// is fetched"
    if not parts.hostname or parts.port is None:
        return f"{APP_METRICS_ENV}={url!r}: needs a host and a port (http://127.0.0.1:PORT/PATH)"
    return None


def _family_names(text: bytes) -> set[bytes]:
    """Names declared by ``# TYPE`` lines, plus bare sample names."""
    names = set()
    for line in text.splitlines():
        if line.startswith(b"# TYPE "):
            parts = line.split()
            if len(parts) >= 3:
                names.add(parts[2])
        elif line and not line.startswith(b"#"):
            m = _NAME.match(line)
            if m:
                names.add(m.group())
    return names


def _owner(sample: bytes, families: set[bytes]) -> bytes:
    """The family a sample name belongs to (``x_bucket`` belongs to ``x``)."""
    if sample in families:
        return sample
    for suffix in _SAMPLE_SUFFIXES:
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            return sample[: -len(suffix)]
    return sample


def merge(ours: bytes, app: bytes) -> bytes:
    """``ours`` followed by the app's families whose names ours does not use.

    Two families of one name would make Prometheus reject the whole scrape, so
    on a clash ours wins and the app's family is left out. An OpenMetrics
    ``# EOF`` line from the app is dropped: ours is the text format.
    """
    taken = _family_names(ours)
    kept: list[bytes] = []
    declared: set[bytes] = set()
    for line in app.splitlines():
        if line.startswith((b"# TYPE ", b"# HELP ")):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) >= 3 else b""
            declared.add(name)
            if name in taken:
                continue
        elif line.startswith(b"#") or not line.strip():
            if line.strip() == b"# EOF":
                continue
        else:
            m = _NAME.match(line)
            if m and _owner(m.group(), declared) in taken:
                continue
        kept.append(line)
    if not kept:
        return ours
    head = ours if ours.endswith(b"\n") or not ours else ours + b"\n"
    return head + b"\n".join(kept) + b"\n"


class AppMetrics:
    """Fetches the app's exposition at scrape time; counts each way it can fail."""

    def __init__(
        self,
        url: str,
        registry: CollectorRegistry,
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.failures = Counter(
            "traffic_color_app_metrics_scrape_failures",
            "Scrapes of the app's own metrics (TRAFFIC_COLOR_APP_METRICS) that got nothing.",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    async def fetch(self) -> bytes:
        """The app's exposition, or b"" (counted and logged) when it does not answer in bounds."""
        reason = detail = ""
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url, headers={"Accept": ACCEPT}, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    reason, detail = "status", f"HTTP {resp.status}"
                else:
                    body = await resp.content.read(self.max_bytes + 1)
                    if len(body) <= self.max_bytes:
                        return body
                    reason, detail = "too_large", f"more than {self.max_bytes} bytes"
        except TimeoutError:
            reason, detail = "timeout", f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            reason, detail = "connect", str(exc) or type(exc).__name__
        self.failures.labels(reason).inc()
        log.warning("app metrics from %s not merged (%s): %s", self.url, reason, detail)
        return b""
