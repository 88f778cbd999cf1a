#!/usr/bin/env bash
# The OCI image (`make image`), checked without a container runtime: its configuration,
# then its file system unpacked from the saved image and every file in it, then
# `latchkey --version` and `latchkey serve` run from that file system as the image's user,
# in its working directory, until /readyz answers 200 and SIGTERM stops it with exit 0.
# Skips (exit 0) only where podman and buildah are missing and cannot be installed; every
# other problem fails. Needs root (chroot and a private mount namespace).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
# Whether a child is still running (kill -0 also succeeds on one that exited unwaited).
running() { local state; state=$(cut -d' ' -f3 "/proc/$1/stat" 2> /dev/null) && [ "$state" != Z ]; }

if ! command -v podman > /dev/null || ! command -v buildah > /dev/null; then
  make --no-print-directory image-tools ||
    { echo "SKIP: podman and buildah are not installed and could not be installed (apt-get)"; exit 0; }
fi
[ "$(id -u)" = 0 ] || fail "needs root: the image's file system is entered with chroot"
for tool in python3 curl unshare; do
  command -v "$tool" > /dev/null || fail "needs $tool"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
image="latchkey:$version"
make --no-print-directory image

work=$(mktemp -d target/image-test.XXXXXX)
root="$work/root"
pid=
cleanup() {
  if [ -n "$pid" ]; then
    kill -KILL "$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
  fi
  # /proc is mounted in the server's own mount namespace, which ends with it; this only
  # guards against a mount that somehow reached this namespace.
  if mountpoint -q "$root/proc" 2> /dev/null; then umount "$root/proc"; fi
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# The image as it would be pushed: an OCI layout with its manifest, config and layers.
podman save --quiet --format oci-dir -o "$work/oci" "$image"
python3 - "$work/oci" > "$work/image.txt" << 'PY'
import json, sys
oci = sys.argv[1]
def blob(digest):
    return f"{oci}/blobs/{digest.replace(':', '/')}"
index = json.load(open(f"{oci}/index.json"))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
config = json.load(open(blob(manifest["config"]["digest"])))["config"]
labels = config.get("Labels") or {}
print("user", config.get("User", ""))
print("entrypoint", json.dumps(config.get("Entrypoint")))
print("cmd", json.dumps(config.get("Cmd")))
print("workdir", config.get("WorkingDir", ""))
print("version", labels.get("org.opencontainers.image.version", ""))
print("licenses", labels.get("org.opencontainers.image.licenses", ""))
for env in config.get("Env") or []:
    print("env", env)
for layer in manifest["layers"]:
    print("layer", blob(layer["digest"]))
PY
field() { sed -n "s/^$1 //p" "$work/image.txt"; }

[ "$(field user)" = "65532:65532" ] || fail "image user is '$(field user)', not 65532:65532"
ok "user 65532:65532"
[ "$(field entrypoint)" = '["/usr/local/bin/latchkey"]' ] ||
  fail "entrypoint is $(field entrypoint), not [\"/usr/local/bin/latchkey\"]"
[ "$(field cmd)" = '["serve"]' ] || fail "command is $(field cmd), not [\"serve\"]"
ok "entrypoint /usr/local/bin/latchkey, command serve"
workdir=$(field workdir)
[ "$workdir" = /var/lib/latchkey ] || fail "working directory is '$workdir', not /var/lib/latchkey"
[ "$(field version)" = "$version" ] || fail "version label is '$(field version)', not $version"
[ "$(field licenses)" = Apache-2.0 ] || fail "licenses label is '$(field licenses)', not Apache-2.0"
ok "working directory $workdir, labels version $version and licenses Apache-2.0"

# Unpacked layer by layer, owners and modes as recorded (root extracts with both).
mkdir "$root"
while read -r layer; do
  if tar -tf "$layer" | grep -q '\.wh\.'; then fail "layer $layer deletes files (whiteouts)"; fi
  tar -xf "$layer" -C "$root" --numeric-owner
done < <(field layer)
find "$root" -mindepth 1 -printf '%P %M %U:%G\n' | sort > "$work/files.txt"

# Runs a command from the image's file system as the image's user, in its working
# directory, with only the image's environment and the given variables: what a container
# runtime does. chroot(8) always starts in /, hence unshare's --root and --wd. It ends in
# exec, so call it in a subshell: in the background, $! is then latchkey itself.
in_image() {
  local env=() line
  while IFS= read -r line; do env+=("$line"); done < <(field env)
  while [[ $# -gt 0 && $1 == *=* ]]; do env+=("$1"); shift; done
  exec env -i "${env[@]}" "$(command -v unshare)" --root="$root" --wd="$workdir" \
    --setuid 65532 --setgid 65532 "$@"
}

# Nothing but the binary, its libraries (as the image's own loader resolves them: none
# missing), the CA certificates, passwd, group, nsswitch.conf, the working directory, /tmp.
interp=$(python3 - "$root/usr/local/bin/latchkey" << 'PY'
import struct, sys
elf = open(sys.argv[1], "rb").read()
assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not a 64-bit ELF file"
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
for i in range(phnum):
    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
    if p_type == 3:  # PT_INTERP
        print(elf[p_offset:p_offset + p_filesz].rstrip(b"\0").decode())
PY
)
[ -n "$interp" ] || fail "latchkey names no dynamic loader"
[ -x "$root$interp" ] || fail "the dynamic loader $interp is not in the image"
(in_image "$interp" --list /usr/local/bin/latchkey) > "$work/libs.txt" ||
  fail "the image's loader cannot load latchkey: $(cat "$work/libs.txt")"
if grep -q 'not found' "$work/libs.txt"; then fail "libraries missing: $(grep 'not found' "$work/libs.txt")"; fi
expected=(etc etc/group etc/nsswitch.conf etc/passwd etc/ssl etc/ssl/certs
  etc/ssl/certs/ca-certificates.crt tmp usr usr/local usr/local/bin usr/local/bin/latchkey
  usr/local/lib usr/local/lib/latchkey usr/local/lib/latchkey/liblatchkey_module.so
  var var/lib var/lib/latchkey)
libs=$(grep -o '/[^ ]*' "$work/libs.txt")
for lib in $libs; do
  path=${lib#/}
  while [ "$path" != . ]; do expected+=("$path"); path=$(dirname "$path"); done
done
printf '%s\n' "${expected[@]}" | sort -u > "$work/expected.txt"
extra=$(cut -d' ' -f1 "$work/files.txt" | comm -23 - "$work/expected.txt")
missing=$(cut -d' ' -f1 "$work/files.txt" | comm -13 - "$work/expected.txt")
[ -z "$extra" ] || fail "the image holds more than it should: ${extra//$'\n'/ }"
[ -z "$missing" ] || fail "the image lacks: ${missing//$'\n'/ }"
while read -r path mode owner; do
  case "$path" in
    var/lib/latchkey) want="drwx------ 65532:65532" ;;
    tmp) want="drwxrwxrwt 0:0" ;;
    usr/local/bin/latchkey | "${interp#/}") want="-rwxr-xr-x 0:0" ;;
    *) want="${mode:0:1}" ;;
  esac
  if [ ${#want} -gt 1 ]; then
    [ "$mode $owner" = "$want" ] || fail "/$path is $mode $owner, not $want"
  else
    # Everything else: a directory or a plain file of root's that only root may change.
    case "$mode $owner" in
      "drwxr-xr-x 0:0" | "-rw-r--r-- 0:0" | "-rwxr-xr-x 0:0") ;;
      *) fail "/$path is $mode $owner: want root's, mode 0755 or 0644" ;;
    esac
  fi
done < "$work/files.txt"
ok "files: $(wc -l < "$work/files.txt") entries, all expected (libraries: ${libs//$'\n'/ }); no shell"
cmp -s "$root/usr/local/bin/latchkey" target/release/latchkey ||
  fail "/usr/local/bin/latchkey is not target/release/latchkey"
cmp -s "$root/usr/local/lib/latchkey/liblatchkey_module.so" target/release/liblatchkey_module.so ||
  fail "/usr/local/lib/latchkey/liblatchkey_module.so is not target/release/liblatchkey_module.so"
grep -q -- '-----BEGIN CERTIFICATE-----' "$root/etc/ssl/certs/ca-certificates.crt" ||
  fail "/etc/ssl/certs/ca-certificates.crt holds no certificate"
grep -qx 'nonroot:x:65532:65532:nonroot:/var/lib/latchkey:/sbin/nologin' "$root/etc/passwd" ||
  fail "/etc/passwd has no user 65532"
grep -qx 'nonroot:x:65532:' "$root/etc/group" || fail "/etc/group has no group 65532"
ok "the release binary and module, CA certificates, user and group 65532"

out=$(in_image /usr/local/bin/latchkey --version) || fail "latchkey --version failed: $out"
[ "$out" = "latchkey $version" ] || fail "latchkey --version printed '$out', not 'latchkey $version'"
ok "latchkey --version: $out"

# What the in-process overlay's init container runs: the module copied out of the image,
# read-only, for Envoy's container to load. No /proc here, as in an image without one.
out=$(in_image /usr/local/bin/latchkey install-module /tmp/module) ||
  fail "latchkey install-module failed: $out"
installed="$root/tmp/module/liblatchkey_module.so"
cmp -s "$installed" target/release/liblatchkey_module.so ||
  fail "install-module did not copy the image's module: $out"
[ "$(stat -c '%A %u:%g' "$installed")" = "-r--r--r-- 65532:65532" ] ||
  fail "the installed module is $(stat -c '%A %u:%g' "$installed"), not -r--r--r-- 65532:65532"
rm -rf "$root/tmp/module"
ok "latchkey install-module: $out"

# serve with the image's defaults (SQLite database and minted certificates in the working
# directory), a new master key, and free ports on 127.0.0.1. It needs /proc (it checks
# that its certificate directory is its own); a runtime mounts one, here it is mounted
# in a mount namespace of the server's own, gone when the server exits.
master_key=$(in_image /usr/local/bin/latchkey keygen) || fail "latchkey keygen failed"
read -r grpc_port admin_port http_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
mkdir "$root/proc"
(in_image "LATCHKEY_MASTER_KEY=$master_key" "LATCHKEY_GRPC_ADDR=127.0.0.1:$grpc_port" \
  "LATCHKEY_ADMIN_ADDR=127.0.0.1:$admin_port" "LATCHKEY_HTTP_ADDR=127.0.0.1:$http_port" \
  --mount --mount-proc /usr/local/bin/latchkey serve) > "$work/serve.log" 2>&1 &
pid=$!
started=$(date +%s%N)
status=
for _ in $(seq 300); do
  running "$pid" || { cat "$work/serve.log" >&2; fail "latchkey serve exited before it was ready"; }
  status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/readyz" || true)
  [ "$status" = 200 ] && break
  sleep 0.1
done
[ "$status" = 200 ] || { cat "$work/serve.log" >&2; fail "/readyz answered $status, not 200, after 30 s"; }
ok "latchkey serve ready (/readyz 200) after $((($(date +%s%N) - started) / 1000000)) ms"
[ "$(cat "/proc/$pid/comm")" = latchkey ] || fail "process $pid is not latchkey"
if [ "$(stat -c %u:%g "/proc/$pid")" != 65532:65532 ] || ! grep -q '^Groups:[[:space:]]*$' "/proc/$pid/status"; then
  fail "latchkey serve does not run as 65532:65532 alone: $(grep -E '^(Uid|Gid|Groups):' "/proc/$pid/status")"
fi
[ "$(stat -c %u:%g "$root$workdir/latchkey.db")" = 65532:65532 ] ||
  fail "no database of user 65532 at $workdir/latchkey.db"
[ -s "$root$workdir/.latchkey/tls/ca.pem" ] || fail "no minted certificates in $workdir/.latchkey/tls"
ok "it runs as 65532:65532, its SQLite database and minted certificates are in $workdir"
# Ready comes a moment before latchkey sets its SIGTERM handler (SigCgt bit 15); a SIGTERM
# in between would kill it uncleanly, so stop it once it catches the signal.
catches_term() {
  local mask
  mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$pid/status" 2> /dev/null) && (((16#$mask >> 14) & 1))
}
for _ in $(seq 100); do catches_term && break; sleep 0.1; done
catches_term || fail "latchkey serve does not catch SIGTERM"
stopping=$(date +%s%N)
kill -TERM "$pid"
for _ in $(seq 200); do running "$pid" || break; sleep 0.1; done
if running "$pid"; then cat "$work/serve.log" >&2; fail "latchkey serve still runs 20 s after SIGTERM"; fi
code=0
wait "$pid" || code=$?
pid=
[ "$code" = 0 ] || { cat "$work/serve.log" >&2; fail "latchkey serve exited $code after SIGTERM"; }
ok "SIGTERM: latchkey serve exited 0 after $((($(date +%s%N) - stopping) / 1000000)) ms"

echo "PASS: $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
