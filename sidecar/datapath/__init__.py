"""The kernel side: classifier build, map access, tc and routing, across a process boundary.

The long-lived process (a pod's sidecar, the node agent) imports only this
package's top level; what needs the heavy libraries runs in short-lived
children, in ``sidecar.datapath.child``, which no module here imports (a test
holds that: tests/unit/test_process_boundary.py).

Here, the long-lived side: map and program fds, bpf syscalls and the intent:

- ``abi`` (layouts mirrored from bpf/sc_abi.h), ``bpfsys`` (bpf syscalls over
  libbpf and ctypes), ``maps`` (typed maps), ``memlock``;
- ``manager`` (a pod's data path) and ``node`` (a node's), the facades;
- what is wanted and what is ours, pure: ``routing`` (rules and routes from
  the policy, our protocol tag), ``tc`` (our filters' tags, ``Attachment``),
  ``capture`` (the nftables ruleset), ``netns`` (naming namespaces);
- the parent's end of each child: ``build`` (``build_classifier``), ``ctl``
  (``NetlinkSession``), ``links`` (``LinkWatcher``), ``capture``
  (``run_nft_child``); all start their child with ``spawn``, which also holds
  the one error envelope every child answers with.

``doctor`` is a short-lived command: it reads netlink in-process with the
children's code.
"""
