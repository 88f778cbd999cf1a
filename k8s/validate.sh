#!/usr/bin/env bash
# Checks the manifests offline: renders each overlay with kustomize, checks what it
# renders (render_test.py: images, probes, ports, the data-plane channel, Pod Security,
# disruption budgets, the monitoring objects against latchkey's metrics), checks every
# core object against the Kubernetes API schema (strict: unknown fields fail), and has
# Envoy validate the config each overlay ships. One line per check; non-zero exit on any
# failure.
#
# Run from the repository root. VENV is the Python virtualenv holding
# kubernetes-validate (and with it PyYAML) and envoy (default .venv); KUBE_VERSION the
# API version to check against (default 1.32); MODULE_DIR the directory holding the
# in-process module Envoy loads when validating the inprocess overlay (default
# target/debug, where `make module` builds it).
set -euo pipefail

VENV="${VENV:-.venv}"
KUBE_VERSION="${KUBE_VERSION:-1.32}"
KUBECTL="${KUBECTL:-kubectl}"
OVERLAYS=(separate sidecar inprocess)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
MODULE_DIR="${MODULE_DIR:-$root/target/debug}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=0
pass() { echo "ok    $1"; }
fail() {
  echo "FAIL  $1"
  sed 's/^/      /' "$2"
  failed=1
}

# Envoy reads the TLS files its config names even when only validating: the render test
# points the mounted ones at this throwaway certificate (its own CA).
mkdir "$tmp/certs"
if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj /CN=validate -keyout "$tmp/certs/tls.key" -out "$tmp/certs/tls.crt" \
  >"$tmp/log" 2>&1; then
  fail "openssl (a throwaway certificate for envoy --mode validate)" "$tmp/log"
fi

rendered=()
for overlay in "${OVERLAYS[@]}"; do
  mkdir "$tmp/$overlay"
  if "$KUBECTL" kustomize "$here/overlays/$overlay" >"$tmp/$overlay/rendered.yaml" \
    2>"$tmp/log"; then
    count="$(grep -c '^kind:' "$tmp/$overlay/rendered.yaml")"
    pass "kustomize k8s/overlays/$overlay ($count objects)"
    rendered+=("$overlay=$tmp/$overlay")
  else
    fail "kustomize k8s/overlays/$overlay" "$tmp/log"
  fi
done

# The render test writes core.yaml (all but the Prometheus Operator's objects, which it
# checks itself) and envoy.yaml (the shipped config, certificates pointed at $tmp/certs)
# next to each rendered.yaml. Its own lines go straight to the output.
if [ "${#rendered[@]}" -gt 0 ]; then
  if ! "$VENV/bin/python" "$here/render_test.py" --repo "$root" --certs "$tmp/certs" \
    "${rendered[@]}" 2>"$tmp/log"; then
    failed=1
    if [ -s "$tmp/log" ]; then fail "render test (k8s/render_test.py)" "$tmp/log"; fi
  fi
fi

for overlay in "${OVERLAYS[@]}"; do
  dir="$tmp/$overlay"
  [ -f "$dir/rendered.yaml" ] || continue
  # The validator reads multi-document YAML. It only warns (exit 0) on a kind it has no
  # schema for, so a WARN line counts as a failure: nothing would have been checked.
  # The monitoring.coreos.com objects are left out of core.yaml for that reason.
  what="schema k8s/overlays/$overlay (Kubernetes $KUBE_VERSION, strict)"
  if [ ! -s "$dir/core.yaml" ]; then
    echo "the render test wrote no core.yaml" >"$tmp/log"
    fail "$what" "$tmp/log"
  elif "$VENV/bin/kubernetes-validate" --strict -k "$KUBE_VERSION" --quiet "$dir/core.yaml" \
    >"$tmp/log" 2>&1 && ! grep -q '^WARN' "$tmp/log"; then
    pass "$what ($(grep -c '^kind:' "$dir/core.yaml") objects)"
  else
    fail "$what" "$tmp/log"
  fi

  # --mode validate loads the whole config (typed configs included) without starting
  # listeners, resolving DNS or opening the Unix socket. It loads the in-process module
  # too, which refuses an Envoy other than the one it was written for.
  what="envoy --mode validate k8s/overlays/$overlay (its envoy-config ConfigMap)"
  if [ ! -s "$dir/envoy.yaml" ]; then
    echo "the render test found no Envoy config to validate" >"$tmp/log"
    fail "$what" "$tmp/log"
  elif grep -q dynamic_modules "$dir/envoy.yaml" && [ ! -f "$MODULE_DIR/liblatchkey_module.so" ]; then
    echo "no $MODULE_DIR/liblatchkey_module.so to load: build it first (make module)" >"$tmp/log"
    fail "$what" "$tmp/log"
  elif ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$MODULE_DIR" \
    "$VENV/bin/envoy" --mode validate -c "$dir/envoy.yaml" >"$tmp/log" 2>&1; then
    pass "$what"
  else
    fail "$what" "$tmp/log"
  fi
done

# The examples' manifests (not their latchkey policies, which a unit test parses, nor
# their patches, which are partial objects).
for manifest in "$here"/examples/*/*.yaml; do
  case "$manifest" in */policy.yaml | *-patch.yaml) continue ;; esac
  what="schema k8s/examples/${manifest#"$here/examples/"} (Kubernetes $KUBE_VERSION, strict)"
  if "$VENV/bin/kubernetes-validate" --strict -k "$KUBE_VERSION" --quiet "$manifest" \
    >"$tmp/log" 2>&1 && ! grep -q '^WARN' "$tmp/log"; then
    pass "$what"
  else
    fail "$what" "$tmp/log"
  fi
done

exit "$failed"
