"""The sidecar's forwarding path: uvloop + asyncio Protocols.

``Proxy`` (``server.py``) listens on the outbound and inbound sides. What its
parts share sits in the leaf ``context.py``. Each client connection is served
by ``http1.downstream.Downstream``, which colors requests and sends them over a
per-color keep-alive pool (``pool.py``) of ``http1.upstream.UpstreamConnection``s.
Pure request decisions live in ``http1/exchange.py``, backpressure in
``flow.py``, byte pipes (CONNECT, Upgrade) in ``opaque.py``, and the writes of
each loop turn, sent together at its end, in ``batch.py``.
"""

from sidecar.proxy.context import FlowHooks, ProxyContext
from sidecar.proxy.server import Proxy

__all__ = ["FlowHooks", "Proxy", "ProxyContext"]
