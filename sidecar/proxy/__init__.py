"""The sidecar's HTTP forwarding path: uvloop + asyncio Protocols + httptools.

``Proxy`` (``server.py``) listens on the outbound and inbound sides; each client
connection is a ``Downstream`` (``protocol.py``) that colors requests and sends
them over a per-color keep-alive pool of ``UpstreamConnection``s
(``upstream.py``). Pure request decisions live in ``exchange.py``, backpressure
in ``flow.py``, CONNECT/Upgrade pipes in ``tunnel.py``, and the writes of each
loop turn, sent together at its end, in ``batch.py``.
"""

from sidecar.proxy.server import FlowHooks, Proxy, ProxyContext

__all__ = ["FlowHooks", "Proxy", "ProxyContext"]
