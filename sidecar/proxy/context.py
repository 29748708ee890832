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
    from sidecar.policy import Address, Capture, Timeouts
    from sidecar.proxy.lanerouter import LaneRouter

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
    # Capture settings: each accepted connection is checked for an original destination
    # (a capture table redirected it) and its protocol detected; None: no such check.
    capture: Capture | None = None
    own_mark: int = 0  # SO_MARK of our upstream sockets (capture leaves them alone); 0: none
    lanes: LaneRouter | None = None  # outbound.routes; swapped on reload; None: no routes
