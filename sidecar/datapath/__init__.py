"""The kernel side: classifier build (child process), map access, tc and routing.

Importing this package is cheap and never imports ``bcc``: only the short-lived
build child (``python -m sidecar.datapath.build``) does.

The process boundary (``spawn`` starts every child and holds the one error
envelope they all answer with):

- the long-lived process (a pod's sidecar, the node agent) holds map and
  program fds and the intent: ``abi`` (layouts), ``bpfsys`` (bpf syscalls),
  ``maps`` (typed maps), ``manager`` (a pod's data path), ``node`` (a node's);
- children hold what is heavy: ``build`` (BCC/LLVM: compile, load, send fds),
  ``ctl`` (pyroute2: runs ``tc`` filters and ``routing`` rules and routes,
  through ``netns``), ``links`` (pyroute2: link events for the node agent).
  Their parent side (``build_classifier``, ``NetlinkSession``, ``LinkWatcher``)
  imports neither library.
"""
