"""traffic-color: a sidecar that colors HTTP traffic and lets the kernel route each color."""

__version__ = "0.1.0"
