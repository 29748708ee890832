"""What the parts of the proxy share: a leaf module that imports none of them.

``ProxyContext`` is what the runtime hands the proxy (and swaps fields of on
reload), ``FlowHooks`` is how the kernel data path hears about upstream flows,
and ``Key`` names a pool of upstream connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.admin.metrics import ProxyMetrics
    from sidecar.coloring import Colorer
    from sidecar.policy import Address, Timeouts

Key = tuple[str, str, int]  # (color, host, port)


class FlowHooks(Protocol):
    """Where the kernel data path learns about upstream flows (one color each)."""

    def flow_open(self, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None: ...

    def flow_close(self, color: str, local: tuple[str, int], remote: tuple[str, int]) -> None: ...


@dataclass
class ProxyContext:
    colorer: Colorer  # swapped by the lead on reload; read per request
    metrics: ProxyMetrics
    timeouts: Timeouts  # swapped on reload too
    app: Address  # the inbound side's upstream, swapped on reload
    hooks: FlowHooks | None = None  # may be set after start; a raising hook is logged
