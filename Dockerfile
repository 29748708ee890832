# traffic-color sidecar (and admission webhook) image.
#
# Debian bookworm, because the data path needs Debian's BCC (python3-bpfcc,
# libbpfcc) and PyPI has no real BCC. The package lives in a virtual environment
# that also sees Debian's `bcc` module. Kernel headers are not in the image: the
# chart mounts the node's /lib/modules and /usr/src (read-only).
#
# Build without registry access by passing a local base:
#   --build-arg BASE=localhost/debian-minbase:bookworm   (see .ci/image.sh)
# Behind a TLS-inspecting proxy, mount the machine's CA bundle as a build secret
# and name its path in the CA_BUNDLE build arg (buildah bud and docker buildx alike):
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
#   --build-arg CA_BUNDLE=/run/secrets/ca-bundle
# pip reads it during the build only; a secret mount is never part of a layer.
ARG BASE=debian:bookworm-slim

# ---------------------------------------------------------------- build stage
FROM ${BASE} AS build
ARG CA_BUNDLE=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libnghttp2-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . /src
# Every dependency ships a manylinux wheel for CPython 3.11; the compiler is here only
# for the package's own nghttp2 binding (cffi, built at install). pip and setuptools
# are removed so the final venv holds no build tools.
# PIP_CERT (not --cert) so the isolated build-dependency install sees it too.
RUN --mount=type=secret,id=ca-bundle,required=false \
    if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi \
 && python3 -m venv /opt/traffic-color \
 && /opt/traffic-color/bin/pip install --only-binary=:all: --no-binary=traffic-color /src \
 && /opt/traffic-color/bin/pip uninstall -y pip setuptools \
 && find /opt/traffic-color -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------- final stage
FROM ${BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="traffic-color" \
      org.opencontainers.image.description="Kubernetes sidecar that colors HTTP traffic and routes each color its own way with a tc/eBPF classifier" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build /opt/traffic-color /opt/traffic-color
# Run-time packages only: BCC's Python module and library (which needs libbpf1,
# also called directly through ctypes), libnftables' Python binding for capture,
# nghttp2 for HTTP/2, and iproute2 and nft for operators' debugging. The venv sees Debian's bcc and
# nftables modules through one symlink each, as `make install` does.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc libbpfcc libbpf1 libnghttp2-14 iproute2 \
    python3-nftables nftables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && site="$(/opt/traffic-color/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && ln -s /usr/lib/python3/dist-packages/bcc "${site}/bcc" \
 && ln -s /usr/lib/python3/dist-packages/nftables "${site}/nftables" \
 && /opt/traffic-color/bin/python -c 'import bcc, nftables, sidecar, sidecar.proxy.http2'
ENV PATH="/opt/traffic-color/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
EXPOSE 15001 15006 15090
ENTRYPOINT ["traffic-color"]
CMD ["run"]
