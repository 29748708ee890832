"""The ``make demo`` topology, backend and script, also reused by the end-to-end tests.

Nothing here is imported by the sidecar itself: these modules build a small
world of network namespaces around it so that colored routing can be seen.
"""
