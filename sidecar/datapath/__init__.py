"""The kernel side: classifier build (child process), map access, tc and routing.

Importing this package is cheap and never imports ``bcc``: only the short-lived
build child (``python -m sidecar.datapath.build``) does.
"""
