#!/usr/bin/env bash
# Checks the manifests offline: renders the kustomize base and the example overlay, checks
# every rendered object against the Kubernetes API schema (strict: unknown fields fail),
# and has Envoy validate its config. One line per check; non-zero exit on any failure.
#
# Run from the repository root. VENV is the Python virtualenv holding
# kubernetes-validate and envoy (default .venv); KUBE_VERSION the API version to check
# against (default 1.32).
set -euo pipefail

VENV="${VENV:-.venv}"
KUBE_VERSION="${KUBE_VERSION:-1.32}"
KUBECTL="${KUBECTL:-kubectl}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=0
pass() { echo "ok    $1"; }
fail() {
  echo "FAIL  $1"
  sed 's/^/      /' "$2"
  failed=1
}

for target in base overlays/example; do
  out="$tmp/${target//\//_}.yaml"
  log="$tmp/log"
  if ! "$KUBECTL" kustomize "$here/$target" >"$out" 2>"$log"; then
    fail "kustomize k8s/$target" "$log"
    continue
  fi
  pass "kustomize k8s/$target ($(grep -c '^kind:' "$out") objects)"
  # The validator reads multi-document YAML. It only warns (exit 0) on a kind it has
  # no schema for, so a WARN line counts as a failure: nothing would have been checked.
  if "$VENV/bin/kubernetes-validate" --strict -k "$KUBE_VERSION" --quiet "$out" \
    >"$log" 2>&1 && ! grep -q '^WARN' "$log"; then
    pass "schema k8s/$target (Kubernetes $KUBE_VERSION, strict)"
  else
    fail "schema k8s/$target (Kubernetes $KUBE_VERSION, strict)" "$log"
  fi
done

# --mode validate loads the whole config (typed configs included) without starting
# listeners or resolving DNS, so the Service name need not exist here. It does read the
# TLS files, though: the mounted Secret's directory is pointed at a throwaway
# certificate (its own CA) made here, and nothing else in the config is changed.
certs=/run/secrets/envoy-grpc-client
mkdir "$tmp/certs"
if ! grep -q "$certs/" "$here/base/envoy.yaml"; then
  echo "no $certs/ in base/envoy.yaml" >"$tmp/log"
  fail "envoy --mode validate k8s/base/envoy.yaml" "$tmp/log"
elif ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=validate -keyout "$tmp/certs/tls.key" -out "$tmp/certs/tls.crt" \
  >"$tmp/log" 2>&1; then
  fail "envoy --mode validate k8s/base/envoy.yaml (openssl)" "$tmp/log"
else
  cp "$tmp/certs/tls.crt" "$tmp/certs/ca.crt"
  sed "s|$certs/|$tmp/certs/|g" "$here/base/envoy.yaml" >"$tmp/envoy.yaml"
  if "$VENV/bin/envoy" --mode validate -c "$tmp/envoy.yaml" >"$tmp/log" 2>&1; then
    pass "envoy --mode validate k8s/base/envoy.yaml"
  else
    fail "envoy --mode validate k8s/base/envoy.yaml" "$tmp/log"
  fi
fi

exit "$failed"
