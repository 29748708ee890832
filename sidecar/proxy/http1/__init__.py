"""HTTP/1 on asyncio Protocols + httptools.

``downstream`` is the client side (a ``Downstream`` per connection, requests
colored and forwarded), ``upstream`` the response relay (``UpstreamConnection``),
``exchange`` the pure decisions and head building both share.
"""
