"""HTTP/2 and gRPC (h2c, prior knowledge) on nghttp2, each stream colored on its own.

Importing this package loads the compiled binding; the proxy does so only when
a connection opens with the HTTP/2 preface (see ``H2Side``).
"""

from sidecar.proxy.http2.side import H2Side

__all__ = ["H2Side"]
