"""The Pod Security Standards level a pod meets, from the published rules (kubernetes.io,
"Pod Security Standards"), for the fields injection touches: written here so the chart
README's table of levels per mode is checked, not just stated.

Baseline: no host namespaces, not privileged, capabilities added only from the
baseline list, no hostPath volumes, no host ports, seccomp not Unconfined.
Restricted, on top: only ephemeral-safe volume types, allowPrivilegeEscalation
false, runAsNonRoot, seccomp RuntimeDefault or Localhost, capabilities drop ALL
and add at most NET_BIND_SERVICE.
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def baseline_problems(spec: dict[str, Any]) -> list[str]:
    out = [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    out += [f"volume {v['name']}: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]
    pod_seccomp = (spec.get("securityContext") or {}).get("seccompProfile", {}).get("type")
    for c in _containers(spec):
        ctx = c.get("securityContext") or {}
        if ctx.get("privileged"):
            out.append(f"{c['name']}: privileged")
        added = set((ctx.get("capabilities") or {}).get("add", []))
        out += [f"{c['name']}: adds {cap}" for cap in sorted(added - BASELINE_CAPS)]
        out += [f"{c['name']}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
        if ctx.get("seccompProfile", {}).get("type", pod_seccomp) == "Unconfined":
            out.append(f"{c['name']}: seccomp Unconfined")
    return out


def restricted_problems(spec: dict[str, Any]) -> list[str]:
    out = baseline_problems(spec)
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {', '.join(sorted(kinds))}")
    pod_ctx = spec.get("securityContext") or {}
    for c in _containers(spec):
        ctx = c.get("securityContext") or {}
        name = c["name"]
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        if non_root is not True or ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            out.append(f"{name}: not runAsNonRoot")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccomp {seccomp}")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: does not drop ALL")
        out += [f"{name}: adds {a}" for a in caps.get("add", []) if a != "NET_BIND_SERVICE"]
    return sorted(set(out))


def level(spec: dict[str, Any]) -> str:
    """``restricted``, ``baseline`` or ``privileged``: the strictest level ``spec`` meets."""
    if not restricted_problems(spec):
        return "restricted"
    return "privileged" if baseline_problems(spec) else "baseline"
