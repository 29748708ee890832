"""Sidecar injection: the pure pod mutation and the ``traffic-color inject`` command.

The admission webhook (``sidecar.admin.webhook``) serves the same mutation over
HTTPS, so a manifest injected by hand and a pod injected at admission match.
"""
