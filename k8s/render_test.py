"""Checks what the kustomize overlays render, offline: invariants a schema cannot see.

Called by validate.sh with the repository root, a directory of throwaway certificates
and one directory per overlay (named like the overlay) holding `rendered.yaml`, the
output of `kubectl kustomize`. Prints one line per check (`ok` or `FAIL` with the
reasons) and exits 1 if any failed. Into each overlay directory it writes `core.yaml`
(the objects the Kubernetes schema check can judge: all but the Prometheus Operator's,
which are checked here) and `envoy.yaml` (the Envoy config the overlay ships, with the
mounted certificates pointed at the throwaway ones, for `envoy --mode validate`).

The expected versions come from the repository (Cargo.toml, the Makefile), the metric
names and labels from src/telemetry/metrics.rs, the health routes from
src/control/health.rs and latchkey's default addresses from src/cli/mod.rs.
"""

import argparse
import ipaddress
import json
import os
import posixpath
import re
import sys

import yaml

try:  # installed by `make k8s-validate`
    import promql_parser
except ImportError:
    promql_parser = None

# The data-plane channel each shipped overlay must use.
EXPECTED_CHANNEL = {"separate": "mtls", "sidecar": "unix", "inprocess": "unix"}
# The shipped overlays whose Envoy runs latchkey's in-process module, and the local
# config each overlay's Envoy config must match but for its addresses.
EXPECTED_MODULE = {"inprocess"}
LOCAL_CONFIG = {"inprocess": "envoy/envoy-inprocess.yaml"}
MODULE_FILTER = "envoy.filters.http.dynamic_modules"
LATCHKEY_UID = 65532
# Files Envoy reads from its image rather than from a mounted volume.
IMAGE_FILES = {"/etc/ssl/certs/ca-certificates.crt"}
# Pod Security "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
                  "StorageClass", "CustomResourceDefinition"}
MONITORING_GROUP = "monitoring.coreos.com/"
# Labels Prometheus (with the operator's PodMonitor) puts on every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}
REQUIRED_ALERTS = {"LatchkeyDown", "LatchkeyAuditEventsDropped",
                   "LatchkeyFailClosedDenials", "LatchkeySpendCapReached"}


class Problems(list):
    def add(self, message):
        self.append(message)


# ---------------------------------------------------------------- the repository


def read(root, path):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return f.read()


def cargo_version(root):
    text = read(root, "Cargo.toml")
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    version = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not version:
        raise SystemExit("render test: no version in Cargo.toml's [package]")
    return version.group(1)


def envoy_version(root):
    version = re.search(r"^ENVOY_VERSION\s*:?=\s*(\S+)", read(root, "Makefile"), re.M)
    if not version:
        raise SystemExit("render test: no ENVOY_VERSION in the Makefile")
    return version.group(1)


def serve_defaults(root):
    """LATCHKEY_* variable -> default value, from the serve flags."""
    text = read(root, "src/cli/mod.rs")
    return dict(re.findall(r'env\s*=\s*"(LATCHKEY_\w+)",\s*default_value\s*=\s*"([^"]*)"', text))


def health_routes(root):
    return set(re.findall(r'\.route\(\s*"([^"]+)"', read(root, "src/control/health.rs")))


def rust_strings(root):
    """Every string literal in src/: where a label value must come from."""
    found = set()
    for dirpath, _, files in os.walk(os.path.join(root, "src")):
        for name in files:
            if name.endswith(".rs"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    found.update(re.findall(r'"((?:[^"\\\n]|\\.)*)"', f.read()))
    return found


def decision_kinds(root):
    text = read(root, "src/dataplane/denial.rs")
    kinds = set(re.findall(r'Kind::\w+\s*=>\s*"(\w+)"', text))
    if not kinds:
        raise SystemExit("render test: no Kind names in src/dataplane/denial.rs")
    return kinds


def split_args(text):
    """The top-level, comma-separated arguments of a call's argument text."""
    args, depth, current, quoted = [], 0, "", False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            current += c
            if c == "\\":
                current += text[i + 1]
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
            current += c
        elif c in "([{":
            depth += 1
            current += c
        elif c in ")]}":
            depth -= 1
            current += c
        elif c == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    if current.strip():
        args.append(current.strip())
    return args


def exported_metrics(root):
    """Metric name -> set of label names, as latchkey's /metrics exposes them.

    prometheus_client appends `_total` to counters and `_info` to infos; histograms
    expose `_bucket` (with `le`), `_sum` and `_count`.
    """
    text = read(root, "src/telemetry/metrics.rs")
    audit = read(root, "src/telemetry/audit.rs")
    prefix = re.search(r'Registry::with_prefix\(\s*"(\w+)"\s*\)', text)
    prefix = prefix.group(1) + "_" if prefix else ""
    structs = {
        name: set(re.findall(r"^\s*(?:pub\s+)?(\w+)\s*:", body, re.M))
        for name, body in re.findall(r"struct (\w+)\s*\{(.*?)\}", text, re.S)
    }
    audit_fields = re.search(r"pub struct AuditCounters\s*\{(.*?)\}", audit, re.S)
    audit_types = dict(re.findall(r"pub (\w+)\s*:\s*(\w+)", audit_fields.group(1))) \
        if audit_fields else {}
    # The alerts' counters, a struct of metrics.rs: a field is a Counter or a Family.
    alert_fields = re.search(r"pub struct AlertCounters\s*\{(.*?)\n\}", text, re.S)
    alert_types = {}
    for field, ty in re.findall(r"pub (\w+)\s*:\s*(Family<[^>]*>|\w+)\s*,", alert_fields.group(1)
                                if alert_fields else ""):
        family = re.fullmatch(r"Family<\s*(\w+)\s*,\s*(\w+)\s*>", ty.strip())
        alert_types[field] = (family.group(2), structs.get(family.group(1))) if family \
            else (ty.strip(), set())
    lets = {}
    for var, expr in re.findall(r"let (\w+)\s*=\s*([^;]+);", text):
        family = re.match(r"Family::<\s*(\w+)\s*,\s*(\w+)\s*>", expr)
        if family:
            lets[var] = (family.group(2), structs.get(family.group(1)))
        else:
            kind = re.match(r"(Counter|Gauge|Histogram)\b", expr)
            if kind:
                lets[var] = (kind.group(1), set())
    metrics = {}
    for start in [m.end() for m in re.finditer(r"registry\.register\(", text)]:
        depth, i, quoted = 1, start, False
        while depth:
            c = text[i]
            if quoted:
                if c == "\\":
                    i += 1
                elif c == '"':
                    quoted = False
            elif c == '"':
                quoted = True
            else:
                depth += {"(": 1, ")": -1}.get(c, 0)
            i += 1
        args = split_args(text[start:i - 1])
        name = args[0].strip('"')
        value = args[2] if len(args) > 2 else ""
        kind, labels = None, None
        var = re.fullmatch(r"(\w+)\.clone\(\)", value)
        field = re.fullmatch(r"audit\.(\w+)\.clone\(\)", value)
        alert = re.fullmatch(r"alerts\.(\w+)\.clone\(\)", value)
        if var and var.group(1) in lets:
            kind, labels = lets[var.group(1)]
        elif field and field.group(1) in audit_types:
            kind, labels = audit_types[field.group(1)], set()
        elif alert and alert.group(1) in alert_types:
            kind, labels = alert_types[alert.group(1)]
        elif "Info::new" in value:
            kind, labels = "Info", set(re.findall(r'\(\s*"(\w+)"\s*,', value))
        if kind is None or labels is None:
            raise SystemExit(f"render test: cannot tell the type of metric {name!r} "
                             "in src/telemetry/metrics.rs; teach k8s/render_test.py")
        full = prefix + name
        if kind == "Counter":
            metrics[full + "_total"] = labels
        elif kind == "Gauge":
            metrics[full] = labels
        elif kind == "Info":
            metrics[full + "_info"] = labels
        elif kind == "Histogram":
            metrics[full + "_bucket"] = labels | {"le"}
            metrics[full + "_sum"] = labels
            metrics[full + "_count"] = labels
        else:
            raise SystemExit(f"render test: metric {name!r} has type {kind}; teach "
                             "k8s/render_test.py")
    if not metrics:
        raise SystemExit("render test: no metrics found in src/telemetry/metrics.rs")
    return metrics


# ---------------------------------------------------------------- the rendered objects


class Pod:
    """A pod template (or pod) and the workload it belongs to."""

    def __init__(self, owner, meta, spec):
        self.owner = owner
        self.name = f"{owner['kind']}/{owner['metadata']['name']}"
        self.namespace = owner["metadata"].get("namespace")
        self.labels = (meta or {}).get("labels") or {}
        self.spec = spec or {}

    def containers(self):
        return (self.spec.get("initContainers") or []) + (self.spec.get("containers") or [])

    def container(self, name):
        return next((c for c in self.containers() if c.get("name") == name), None)

    def volume(self, name):
        return next((v for v in self.spec.get("volumes") or [] if v.get("name") == name), None)

    def security(self, container, key):
        """A security setting as it applies to the container (its own, else the pod's)."""
        own = (container.get("securityContext") or {}).get(key)
        return own if own is not None else (self.spec.get("securityContext") or {}).get(key)

    def groups(self, container):
        sc = self.spec.get("securityContext") or {}
        groups = set(sc.get("supplementalGroups") or [])
        for g in (self.security(container, "runAsGroup"), sc.get("fsGroup")):
            if g is not None:
                groups.add(g)
        return groups


def pods_of(objects):
    pods = []
    for obj in objects:
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == "Pod":
            pods.append(Pod(obj, obj.get("metadata"), spec))
        elif kind == "CronJob":
            template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
            pods.append(Pod(obj, template.get("metadata"), template.get("spec")))
        elif "template" in spec and kind in {"Deployment", "StatefulSet", "DaemonSet",
                                             "ReplicaSet", "Job", "ReplicationController"}:
            template = spec["template"] or {}
            pods.append(Pod(obj, template.get("metadata"), template.get("spec")))
    return pods


def selects(selector, labels):
    selector = selector or {}
    if selector.get("matchExpressions"):
        return None  # not judged here
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    return all(labels.get(k) == v for k, v in match.items())


def env(container):
    return {e["name"]: e.get("value") for e in container.get("env") or [] if "name" in e}


def parse_addr(value):
    """`host:port` -> (host, port); `unix:/path` -> ("unix", path)."""
    if value.startswith("unix:"):
        return "unix", value[len("unix:"):]
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def named_port(container, port):
    """A probe's or endpoint's port (number or name) as a number, in this container."""
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def walk(node):
    """Every (key, value) of a nested YAML document, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def mounted_from(pod, container, path):
    """(volume, mount) that provides the file `path` in the container, or (None, reason)."""
    best = None
    for mount in container.get("volumeMounts") or []:
        root = mount.get("mountPath", "").rstrip("/")
        if path.startswith(root + "/") and (best is None or len(root) > len(best[0])):
            best = (root, mount)
    if best is None:
        return None, "is on no mounted volume"
    root, mount = best
    volume = pod.volume(mount.get("name"))
    if volume is None:
        return None, f"is mounted from volume {mount.get('name')!r}, which the pod lacks"
    relative = path[len(root) + 1:]
    if mount.get("subPath"):
        return None, "is under a subPath mount (not followed here)"
    for kind in ("secret", "configMap"):
        items = (volume.get(kind) or {}).get("items")
        if items is not None and relative not in {i.get("path") for i in items}:
            return None, f"is not among the items of volume {volume['name']!r}"
    return (volume, mount), None


# ---------------------------------------------------------------- the Envoy config


class Shipped:
    """The Envoy config a pod mounts, as rendered into its ConfigMap."""

    def __init__(self, pod, container, text):
        self.pod, self.container, self.text = pod, container, text
        self.config = yaml.safe_load(text)


def envoy_config(objects, pod, container, problems):
    args = list(container.get("command") or []) + list(container.get("args") or [])
    path = None
    for i, arg in enumerate(args):
        if arg in ("-c", "--config-path") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config-path="):
            path = arg.split("=", 1)[1]
    if path is None:
        problems.add(f"{pod.name}: container envoy has no -c CONFIG argument")
        return None
    found, why = mounted_from(pod, container, path)
    if found is None:
        problems.add(f"{pod.name}: Envoy's config {path} {why}")
        return None
    volume, mount = found
    name = (volume.get("configMap") or {}).get("name")
    if not name:
        problems.add(f"{pod.name}: Envoy's config {path} is not from a ConfigMap")
        return None
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    for item in (volume["configMap"].get("items") or []):
        if item.get("path") == key:
            key = item.get("key")
    configmap = next((o for o in objects if o.get("kind") == "ConfigMap"
                      and o["metadata"]["name"] == name
                      and o["metadata"].get("namespace") == pod.namespace), None)
    if configmap is None or key not in (configmap.get("data") or {}):
        problems.add(f"{pod.name}: ConfigMap {name} with key {key} is not in the render")
        return None
    return Shipped(pod, container, configmap["data"][key])


def grpc_clusters(config):
    """Clusters Envoy talks gRPC to (ext_proc, ext_authz, access log): the data plane."""
    names = {v.get("cluster_name") for k, v in walk(config)
             if k == "envoy_grpc" and isinstance(v, dict)}
    clusters = (config.get("static_resources") or {}).get("clusters") or []
    return [c for c in clusters if c.get("name") in names], names


def endpoint_addresses(cluster):
    for group in (cluster.get("load_assignment") or {}).get("endpoints") or []:
        for lb in group.get("lb_endpoints") or []:
            yield ((lb.get("endpoint") or {}).get("address") or {})


def module_filters(config):
    """The filter configs (JSON) of the in-process module's filters in an Envoy config."""
    found = []
    for key, value in walk(config):
        if key != "http_filters" or not isinstance(value, list):
            continue
        for f in value:
            if isinstance(f, dict) and f.get("name") == MODULE_FILTER:
                typed = f.get("typed_config") or {}
                text = (typed.get("filter_config") or {}).get("value") or "{}"
                try:
                    found.append(json.loads(text))
                except ValueError:
                    found.append({"unreadable": text})
    return found


def listener_ports(config):
    ports = []
    for listener in (config.get("static_resources") or {}).get("listeners") or []:
        sa = (listener.get("address") or {}).get("socket_address") or {}
        if "port_value" in sa:
            ports.append((sa.get("address", ""), sa["port_value"]))
    return ports


# ---------------------------------------------------------------- the checks


class Overlay:
    def __init__(self, name, directory, objects):
        self.name, self.directory, self.objects = name, directory, objects
        self.pods = pods_of(objects)
        self.envoys = []  # Shipped, one per pod running Envoy

    def of_kind(self, *kinds):
        return [o for o in self.objects if o.get("kind") in kinds]

    def latchkey_pods(self):
        return [(p, p.container("latchkey")) for p in self.pods if p.container("latchkey")]

    def envoy_pods(self):
        return [(p, p.container("envoy")) for p in self.pods if p.container("envoy")]


def in_registry(image, expected):
    """`expected` (name:tag) moved to a registry of your own: same tag, or a digest."""
    name, tag = expected.rsplit(":", 1)
    return re.fullmatch(rf"(.+/)?{re.escape(name)}(:{re.escape(tag)}|@sha256:[0-9a-f]{{64}})",
                        image) is not None


def check_images(o, repo):
    p = Problems()
    want = {"latchkey": f"latchkey:{repo.version}",
            "envoy": f"envoyproxy/envoy:v{repo.envoy}",
            # Copies the module from latchkey's image: the same build as the server.
            "latchkey-module": f"latchkey:{repo.version}"}
    source = {"latchkey": "`make image`: the version in Cargo.toml",
              "envoy": "the Makefile's ENVOY_VERSION",
              "latchkey-module": "`make image`: the version in Cargo.toml"}
    # The shipped overlays name the images exactly; one of your own may name them in
    # your registry (images: newName), at the same tag or by digest.
    shipped = o.name in EXPECTED_CHANNEL
    seen = set()
    for pod in o.pods:
        for c in pod.containers():
            expected = want.get(c.get("name"))
            image = c.get("image") or ""
            if expected is None:
                p.add(f"{pod.name}: container {c.get('name')!r} ({c.get('image')}) is "
                      "neither latchkey nor envoy; its image is not pinned by any check")
            elif image != expected and (shipped or not in_registry(image, expected)):
                p.add(f"{pod.name}: container {c['name']} runs {image}, expected "
                      f"{expected} ({source[c['name']]})")
            seen.add(c.get("name"))
    for name in ("latchkey", "envoy"):
        if name not in seen:
            p.add(f"no {name} container in the render")
    return p


def check_namespace(o, repo):
    p = Problems()
    namespaces = o.of_kind("Namespace")
    if len(namespaces) != 1:
        p.add(f"expected one Namespace, found {len(namespaces)}")
        return p
    ns = namespaces[0]
    labels = ns["metadata"].get("labels") or {}
    for mode in ("enforce", "audit", "warn"):
        key = f"pod-security.kubernetes.io/{mode}"
        if labels.get(key) != "restricted":
            p.add(f"Namespace {ns['metadata']['name']}: {key} is {labels.get(key)!r}, "
                  "expected 'restricted'")
    for obj in o.objects:
        if obj.get("kind") in CLUSTER_SCOPED:
            continue
        if obj["metadata"].get("namespace") != ns["metadata"]["name"]:
            p.add(f"{obj['kind']}/{obj['metadata']['name']} is in namespace "
                  f"{obj['metadata'].get('namespace')!r}, not {ns['metadata']['name']!r}")
    return p


def check_restricted(o, repo):
    p = Problems()
    for pod in o.pods:
        spec = pod.spec
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                p.add(f"{pod.name}: {key} is set")
        for v in spec.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                p.add(f"{pod.name}: volume {v.get('name')} is {sorted(kinds)}, not allowed "
                      "by Pod Security restricted")
        sc = spec.get("securityContext") or {}
        if sc.get("sysctls"):
            p.add(f"{pod.name}: sets sysctls")
        names = []
        for c in pod.containers():
            where = f"{pod.name}: container {c.get('name')}"
            csc = c.get("securityContext") or {}
            if pod.security(c, "runAsNonRoot") is not True:
                p.add(f"{where}: runAsNonRoot is not true")
            if pod.security(c, "runAsUser") == 0:
                p.add(f"{where}: runs as root (runAsUser 0)")
            seccomp = (pod.security(c, "seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                p.add(f"{where}: seccompProfile is {seccomp!r}, expected RuntimeDefault")
            apparmor = (pod.security(c, "appArmorProfile") or {}).get("type")
            if apparmor not in (None, "RuntimeDefault", "Localhost"):
                p.add(f"{where}: appArmorProfile is {apparmor!r}")
            if csc.get("allowPrivilegeEscalation") is not False:
                p.add(f"{where}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                p.add(f"{where}: privileged")
            caps = csc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                p.add(f"{where}: capabilities do not drop ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                p.add(f"{where}: adds capabilities {caps.get('add')}")
            if csc.get("readOnlyRootFilesystem") is not True:
                p.add(f"{where}: readOnlyRootFilesystem is not true")
            if c.get("name") == "latchkey" and pod.security(c, "runAsUser") != LATCHKEY_UID:
                p.add(f"{where}: runAsUser is {pod.security(c, 'runAsUser')}, expected "
                      f"{LATCHKEY_UID}")
            for port in c.get("ports") or []:
                if port.get("hostPort"):
                    p.add(f"{where}: hostPort {port['hostPort']}")
                if port.get("name"):
                    names.append(port["name"])
        for name in {n for n in names if names.count(n) > 1}:
            p.add(f"{pod.name}: port name {name!r} is used twice in the pod")
    return p


def latchkey_addr(container, var, repo):
    value = env(container).get(var, repo.defaults.get(var))
    return value, (parse_addr(value) if value else None)


def check_probes(o, repo):
    p = Problems()
    for route in ("/healthz", "/readyz"):
        if route not in repo.routes:
            p.add(f"src/control/health.rs serves no {route}")
    for pod, c in o.latchkey_pods():
        value, addr = latchkey_addr(c, "LATCHKEY_HTTP_ADDR", repo)
        if not addr or addr[0] == "unix":
            p.add(f"{pod.name}: LATCHKEY_HTTP_ADDR {value!r} is not host:port")
            continue
        for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                           ("startupProbe", "/healthz")):
            probe = c.get(kind)
            if probe is None:
                if kind != "startupProbe":
                    p.add(f"{pod.name}: latchkey has no {kind}")
                continue
            get = probe.get("httpGet") or {}
            if get.get("path") != path:
                p.add(f"{pod.name}: latchkey's {kind} asks {get.get('path')!r}, "
                      f"expected httpGet {path}")
            port = named_port(c, get.get("port"))
            if port != addr[1]:
                p.add(f"{pod.name}: latchkey's {kind} probes port {get.get('port')!r} "
                      f"({port}), but LATCHKEY_HTTP_ADDR listens on {addr[1]}")
    for shipped in o.envoys:
        listening = {port for _, port in listener_ports(shipped.config)}
        for kind in ("readinessProbe", "livenessProbe"):
            probe = shipped.container.get(kind)
            if probe is None:
                p.add(f"{shipped.pod.name}: envoy has no {kind}")
                continue
            action = probe.get("tcpSocket") or probe.get("httpGet") or {}
            port = named_port(shipped.container, action.get("port"))
            if port not in listening:
                p.add(f"{shipped.pod.name}: envoy's {kind} probes port "
                      f"{action.get('port')!r} ({port}); Envoy listens on {sorted(listening)}")
    return p


def resolve_target(pod, target):
    """A Service targetPort in a pod -> (container, port number) or None."""
    for c in pod.containers():
        for port in c.get("ports") or []:
            if target in (port.get("name"), port.get("containerPort")):
                return c, port
    return None


def allowed_by_policies(o, pod, port):
    """Whether the NetworkPolicies selecting the pod (if any) let traffic reach port."""
    policies = [np for np in o.of_kind("NetworkPolicy")
                if np["metadata"].get("namespace") == pod.namespace
                and "Ingress" in ((np.get("spec") or {}).get("policyTypes") or ["Ingress"])
                and selects((np.get("spec") or {}).get("podSelector"), pod.labels)]
    if not policies:
        return True
    for np in policies:
        for rule in (np.get("spec") or {}).get("ingress") or []:
            ports = rule.get("ports")
            if ports is None:
                return True
            for rp in ports:
                if rp.get("port") in (None, port.get("containerPort"), port.get("name")):
                    return True
    return False


def check_ports(o, repo):
    p = Problems()
    for pod, c in o.latchkey_pods():
        ports = {port.get("containerPort") for port in c.get("ports") or []}
        wanted = set()
        for var in ("LATCHKEY_GRPC_ADDR", "LATCHKEY_ADMIN_ADDR", "LATCHKEY_HTTP_ADDR"):
            value, addr = latchkey_addr(c, var, repo)
            if addr is None:
                p.add(f"{pod.name}: no {var} and no default for it in src/cli/mod.rs")
                continue
            if addr[0] == "unix":
                continue
            if is_loopback(addr[0]):
                p.add(f"{pod.name}: {var}={value} listens on loopback: unreachable from "
                      "other pods and from the kubelet")
            wanted.add(addr[1])
            if addr[1] not in ports:
                p.add(f"{pod.name}: {var}={value}, but latchkey declares no containerPort "
                      f"{addr[1]}")
        for extra in ports - wanted:
            p.add(f"{pod.name}: latchkey declares containerPort {extra}, which no "
                  "LATCHKEY_*_ADDR listens on")
    for shipped in o.envoys:
        ports = {port.get("containerPort") for port in shipped.container.get("ports") or []}
        listening = set()
        for host, port in listener_ports(shipped.config):
            if is_loopback(host):
                continue
            listening.add(port)
            if port not in ports:
                p.add(f"{shipped.pod.name}: Envoy listens on {host}:{port}, but the envoy "
                      "container declares no such containerPort")
        for extra in ports - listening:
            p.add(f"{shipped.pod.name}: envoy declares containerPort {extra}, which no "
                  "listener in its config uses")
    for svc in o.of_kind("Service"):
        spec = svc.get("spec") or {}
        name = f"Service/{svc['metadata']['name']}"
        pods = [pod for pod in o.pods if pod.namespace == svc["metadata"].get("namespace")
                and spec.get("selector") and selects(spec["selector"], pod.labels)]
        if not pods:
            p.add(f"{name}: its selector {spec.get('selector')} matches no pod")
            continue
        for sp in spec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            for pod in pods:
                found = resolve_target(pod, target)
                if found is None:
                    p.add(f"{name}: port {sp.get('port')} targets {target!r}, which "
                          f"{pod.name} does not declare")
                elif not allowed_by_policies(o, pod, found[1]):
                    p.add(f"{name}: port {sp.get('port')} reaches {pod.name} port "
                          f"{found[1].get('containerPort')}, which no NetworkPolicy admits")
    return p


def check_channel(o, repo):
    p = Problems()
    latchkeys = o.latchkey_pods()
    if not latchkeys or not o.envoys:
        p.add("needs both a latchkey and an Envoy container in the render")
        return p
    kinds = set()
    for shipped in o.envoys:
        clusters, names = grpc_clusters(shipped.config)
        if not clusters:
            p.add(f"{shipped.pod.name}: Envoy's config names no gRPC cluster for latchkey")
        for missing in names - {c.get("name") for c in clusters}:
            p.add(f"{shipped.pod.name}: Envoy's config uses gRPC cluster {missing!r}, "
                  "which it does not define")
        for cluster in clusters:
            where = f"{shipped.pod.name}: Envoy cluster {cluster.get('name')!r}"
            addresses = list(endpoint_addresses(cluster))
            if not addresses:
                p.add(f"{where} has no endpoints")
            for address in addresses:
                if "pipe" in address:
                    kinds.add("unix")
                    check_pipe(o, p, shipped, cluster, address["pipe"].get("path"), where)
                elif "socket_address" in address:
                    kinds.add("mtls")
                    check_mtls(o, repo, p, shipped, cluster, address["socket_address"], where)
                else:
                    p.add(f"{where}: endpoint address {address} is neither pipe nor socket")
    for pod, c in latchkeys:
        variables = env(c)
        if variables.get("LATCHKEY_GRPC_INSECURE", "false").lower() not in ("false", "0", ""):
            p.add(f"{pod.name}: LATCHKEY_GRPC_INSECURE is set: anyone reaching the port "
                  "gets upstream credentials")
    expected = EXPECTED_CHANNEL.get(o.name)
    if expected and kinds != {expected}:
        p.add(f"overlay {o.name} must reach latchkey over {expected} only; its Envoy "
              f"config uses {sorted(kinds) or 'nothing'}")
    return p


def check_pipe(o, p, shipped, cluster, path, where):
    pod = shipped.pod
    if cluster.get("transport_socket"):
        p.add(f"{where}: a pipe with a transport_socket (the socket's permissions are "
              "the guard; latchkey speaks no TLS there)")
    latchkey = pod.container("latchkey")
    if latchkey is None:
        p.add(f"{where}: pipe {path}, but no latchkey container in {pod.name} to open it")
        return
    value = env(latchkey).get("LATCHKEY_GRPC_ADDR")
    if value != f"unix:{path}":
        p.add(f"{where}: Envoy dials pipe {path}, latchkey's LATCHKEY_GRPC_ADDR is "
              f"{value!r}")
    for var in ("LATCHKEY_GRPC_TLS_CERT", "LATCHKEY_GRPC_TLS_KEY",
                "LATCHKEY_GRPC_TLS_CLIENT_CA"):
        if var in env(latchkey):
            p.add(f"{pod.name}: {var} is set, but latchkey listens on a Unix socket "
                  "(no TLS there)")
    directory = posixpath.dirname(path or "")
    mounts = {}
    for c in (latchkey, shipped.container):
        mount = mount_at(c, directory)
        if mount is None:
            p.add(f"{pod.name}: container {c['name']} mounts nothing at {directory} "
                  f"(the socket's directory)")
        mounts[c["name"]] = mount
    if all(mounts.values()):
        if mounts["latchkey"]["name"] != mounts["envoy"]["name"]:
            p.add(f"{pod.name}: latchkey and envoy mount different volumes at {directory}")
        elif "emptyDir" not in (pod.volume(mounts["latchkey"]["name"]) or {}):
            p.add(f"{pod.name}: the socket's volume {mounts['latchkey']['name']} is not "
                  "an emptyDir of the pod")
        if mounts["latchkey"].get("readOnly"):
            p.add(f"{pod.name}: latchkey mounts {directory} read-only; it creates the "
                  "socket there")
    # The socket is mode 0660: its group is the fsGroup the emptyDir carries (set-gid),
    # else latchkey's own group; Envoy must be in it.
    sc = pod.spec.get("securityContext") or {}
    group = sc.get("fsGroup", pod.security(latchkey, "runAsGroup"))
    if group is None:
        p.add(f"{pod.name}: neither fsGroup nor latchkey's runAsGroup is set: the "
              "socket's group is unknown")
    elif group not in pod.groups(shipped.container):
        p.add(f"{pod.name}: the socket's group is {group}, and envoy is not in it "
              f"(its groups: {sorted(pod.groups(shipped.container))})")


def check_mtls(o, repo, p, shipped, cluster, sa, where):
    host, port = sa.get("address", ""), sa.get("port_value")
    tls = ((cluster.get("transport_socket") or {}).get("typed_config") or {})
    if not str(tls.get("@type", "")).endswith("UpstreamTlsContext"):
        p.add(f"{where}: TCP to latchkey without TLS")
        return
    common = tls.get("common_tls_context") or {}
    if not common.get("tls_certificates"):
        p.add(f"{where}: no client certificate (tls_certificates): latchkey requires one")
    validation = common.get("validation_context") or {}
    if not validation.get("trusted_ca"):
        p.add(f"{where}: no trusted_ca: latchkey's certificate is not checked")
    if tls.get("sni") not in (None, host):
        p.add(f"{where}: SNI {tls.get('sni')!r} is not the name dialled, {host!r}")
    for san in validation.get("match_typed_subject_alt_names") or []:
        exact = (san.get("matcher") or {}).get("exact")
        if exact not in (None, host):
            p.add(f"{where}: checks SAN {exact!r}, not the name dialled, {host!r}")
    # The name must be a Service of the render: name[.namespace[.svc[.cluster.local]]].
    parts = host.split(".")
    namespace = parts[1] if len(parts) > 1 else shipped.pod.namespace
    svc = next((s for s in o.of_kind("Service") if s["metadata"]["name"] == parts[0]
                and s["metadata"].get("namespace") == namespace), None)
    if svc is None or (len(parts) > 2 and parts[2] != "svc"):
        p.add(f"{where}: dials {host}, which is no Service in the render")
        return
    spec = svc.get("spec") or {}
    if cluster.get("type") == "STRICT_DNS" and spec.get("clusterIP") != "None":
        p.add(f"{where}: STRICT_DNS on Service {parts[0]}, which is not headless: Envoy "
              "would see one address, not every replica")
    sp = next((x for x in spec.get("ports") or [] if x.get("port") == port), None)
    if sp is None:
        p.add(f"{where}: dials port {port}; Service {parts[0]} has no such port")
        return
    latchkeys = [(pod, c) for pod, c in o.latchkey_pods()
                 if pod.namespace == namespace and selects(spec.get("selector"), pod.labels)]
    if not latchkeys:
        p.add(f"{where}: Service {parts[0]} selects no latchkey pod")
    for pod, c in latchkeys:
        value, addr = latchkey_addr(c, "LATCHKEY_GRPC_ADDR", repo)
        found = resolve_target(pod, sp.get("targetPort", port))
        if addr is None or addr[0] == "unix":
            p.add(f"{pod.name}: Envoy dials TCP, latchkey listens on {value!r}")
        elif found is None or found[1].get("containerPort") != addr[1]:
            p.add(f"{where}: Service {parts[0]} port {port} reaches "
                  f"{found and found[1].get('containerPort')} in {pod.name}; "
                  f"LATCHKEY_GRPC_ADDR listens on {addr[1]}")
        variables = env(c)
        for var in ("LATCHKEY_GRPC_TLS_CERT", "LATCHKEY_GRPC_TLS_KEY",
                    "LATCHKEY_GRPC_TLS_CLIENT_CA"):
            if not variables.get(var):
                p.add(f"{pod.name}: {var} is not set: latchkey would mint a CA of its own "
                      "(and fail on a read-only root file system)")
        if found is not None and not allowed_by_policies(o, pod, found[1]):
            p.add(f"{pod.name}: no NetworkPolicy admits Envoy to port {addr and addr[1]}")


def mount_at(container, path):
    """The container's volume mount at exactly `path`, or None."""
    return next((m for m in container.get("volumeMounts") or []
                 if m.get("mountPath", "").rstrip("/") == path.rstrip("/")), None)


def check_module(o, repo):
    """Envoy's in-process module: loaded from a volume an init container fills from
    latchkey's image, and fed its policy over a socket only latchkey's user can open."""
    p = Problems()
    for shipped in o.envoys:
        pod, envoy = shipped.pod, shipped.container
        modules = module_filters(shipped.config)
        if not modules:
            if o.name in EXPECTED_MODULE:
                p.add(f"{pod.name}: Envoy's config loads no latchkey module ({MODULE_FILTER})")
            continue
        latchkey = pod.container("latchkey")
        if latchkey is None:
            p.add(f"{pod.name}: Envoy loads latchkey's module, but no latchkey container "
                  "feeds it")
            continue
        # The socket is the owner's alone, each side checks the other is its own user.
        if pod.security(envoy, "runAsUser") != pod.security(latchkey, "runAsUser"):
            p.add(f"{pod.name}: envoy runs as {pod.security(envoy, 'runAsUser')}, latchkey "
                  f"as {pod.security(latchkey, 'runAsUser')}: the module channel needs "
                  "one user")
        for module in modules:
            socket = module.get("socket") or ""
            value = env(latchkey).get("LATCHKEY_MODULE_SOCKET")
            if not socket.startswith("/"):
                p.add(f"{pod.name}: the module's socket {socket!r} is not an absolute path")
                continue
            if value != socket:
                p.add(f"{pod.name}: the module dials {socket}, latchkey's "
                      f"LATCHKEY_MODULE_SOCKET is {value!r}")
            directory = posixpath.dirname(socket)
            mounts = [mount_at(c, directory) for c in (latchkey, envoy)]
            if None in mounts:
                p.add(f"{pod.name}: latchkey and envoy do not both mount {directory} "
                      "(the module socket's directory)")
            elif mounts[0]["name"] != mounts[1]["name"] or \
                    "emptyDir" not in (pod.volume(mounts[0]["name"]) or {}):
                p.add(f"{pod.name}: {directory} is not one emptyDir of the pod in both")
            elif mounts[0].get("readOnly"):
                p.add(f"{pod.name}: latchkey mounts {directory} read-only; it creates the "
                      "module socket there")
        search = env(envoy).get("ENVOY_DYNAMIC_MODULES_SEARCH_PATH")
        mount = mount_at(envoy, search) if search else None
        if mount is None:
            p.add(f"{pod.name}: envoy's ENVOY_DYNAMIC_MODULES_SEARCH_PATH ({search!r}) is "
                  "no directory it mounts")
            continue
        if not mount.get("readOnly"):
            p.add(f"{pod.name}: envoy mounts the module's directory {search} writable")
        if "emptyDir" not in (pod.volume(mount.get("name")) or {}):
            p.add(f"{pod.name}: the module's volume {mount.get('name')!r} is not an emptyDir")
        installed = False
        for c in pod.spec.get("initContainers") or []:
            theirs = next((m for m in c.get("volumeMounts") or []
                           if m.get("name") == mount.get("name")), None)
            if theirs is None:
                continue
            args = list(c.get("command") or []) + list(c.get("args") or [])
            installed |= (c.get("name") == "latchkey-module" and not c.get("command")
                          and args == ["install-module", theirs.get("mountPath")]
                          and not theirs.get("readOnly"))
        if not installed:
            p.add(f"{pod.name}: no init container latchkey-module runs `install-module` "
                  f"into volume {mount.get('name')!r} (Envoy loads the module from it)")
    return p


def check_files(o, repo):
    """Every file a container is told to read is mounted, the secret ones from Secrets."""
    p = Problems()
    for pod, c in o.latchkey_pods():
        for var, value in env(c).items():
            if not (value or "").startswith("/"):
                continue
            found, why = mounted_from(pod, c, value)
            if found is None:
                p.add(f"{pod.name}: {var}={value} {why}")
            elif re.search(r"_(CERT|KEY|CA|FILE)$", var) and "secret" not in found[0]:
                p.add(f"{pod.name}: {var}={value} is not from a Secret")
    for shipped in o.envoys:
        for key, value in walk(shipped.config):
            if key != "filename" or value in IMAGE_FILES:
                continue
            found, why = mounted_from(shipped.pod, shipped.container, value)
            if found is None:
                p.add(f"{shipped.pod.name}: Envoy's config reads {value}, which {why}")
            elif "secret" not in found[0]:
                p.add(f"{shipped.pod.name}: Envoy's config reads {value}, not from a Secret")
    return p


def check_disruptions(o, repo):
    p = Problems()
    for deployment in o.of_kind("Deployment", "StatefulSet"):
        name = f"{deployment['kind']}/{deployment['metadata']['name']}"
        spec = deployment.get("spec") or {}
        replicas = spec.get("replicas", 1)
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if replicas < 2:
            p.add(f"{name}: {replicas} replica(s): a drain or a rollout leaves none")
        pdbs = [b for b in o.of_kind("PodDisruptionBudget")
                if selects((b.get("spec") or {}).get("selector"), labels)]
        if len(pdbs) != 1:
            p.add(f"{name}: {len(pdbs)} PodDisruptionBudgets select its pods, expected 1")
        for pdb in pdbs:
            bspec = pdb.get("spec") or {}
            if "minAvailable" in bspec:
                value, keeps = bspec["minAvailable"], lambda v: v
            else:
                value, keeps = bspec.get("maxUnavailable"), lambda v: replicas - v
            if not isinstance(value, int):
                p.add(f"PodDisruptionBudget/{pdb['metadata']['name']}: {value!r}: use a "
                      "count, which this check can weigh against the replicas")
            elif not 1 <= keeps(value) <= replicas - 1:
                p.add(f"PodDisruptionBudget/{pdb['metadata']['name']}: with {replicas} "
                      f"replicas it keeps {keeps(value)} available: it must keep at least "
                      "one and let at least one go")
        for hpa in o.of_kind("HorizontalPodAutoscaler"):
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind") == deployment["kind"] and \
                    ref.get("name") == deployment["metadata"]["name"]:
                floor = hpa["spec"].get("minReplicas", 1)
                if floor != replicas:
                    p.add(f"{name}: replicas {replicas} but its HPA's minReplicas is "
                          f"{floor}: each apply resets the count until the HPA acts")
    return p


# ---------------------------------------------------------------- monitoring

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan",
                # Aggregation operators: `sum by (x) (...)` puts no parenthesis after sum.
                "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group", "limitk", "limit_ratio"}
PODMONITOR_SPEC = {"attachMetadata", "bodySizeLimit", "fallbackScrapeProtocol", "jobLabel",
                   "keepDroppedTargets", "labelLimit", "labelNameLengthLimit",
                   "labelValueLengthLimit", "namespaceSelector", "podMetricsEndpoints",
                   "podTargetLabels", "sampleLimit", "scrapeClass", "scrapeProtocols",
                   "selector", "targetLimit"}
POD_ENDPOINT = {"port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
                "scrapeTimeout", "honorLabels", "honorTimestamps", "trackTimestampsStaleness",
                "metricRelabelings", "relabelings", "proxyUrl", "enableHttp2",
                "followRedirects", "filterRunning", "basicAuth", "authorization", "oauth2",
                "bearerTokenSecret", "tlsConfig"}
RULE_GROUP = {"name", "interval", "rules", "limit", "partial_response_strategy",
              "query_offset", "labels"}
RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def promql_parse(expr):
    """(a problem or None, the metric names the PromQL parser finds in expr)."""
    if promql_parser is None:
        return "promql-parser is not installed (make k8s-validate installs it)", set()
    try:
        tree = promql_parser.parse(expr)
    except ValueError as e:
        return f"expr does not parse: {e}", set()
    names, stack = set(), [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
        for attr in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)
    return None, names


def promql_problems(expr, repo, job):
    """Metric names, label names and label values an expression uses, against latchkey."""
    p = []
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range and subquery durations
    used = set()
    # What is left once matchers and label lists are gone: metric names, functions,
    # operators and numbers.
    names_only = re.sub(r"\{[^}]*\}", " ", bare)
    names_only = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                        " ", names_only)
    # Selectors with matchers: name{label op "value", ...}.
    for m in re.finditer(r'([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}', expr):
        name = m.group(1)
        if name in PROMQL_WORDS:
            name = None
        if name is None:
            p.append(f"a selector without a metric name: {m.group(0)}")
            continue
        labels = repo.metrics.get(name)
        if name == "up":
            labels = TARGET_LABELS
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"',
                                           m.group(2)):
            if labels is not None and label not in labels:
                p.append(f"{name} has no label {label!r} (it has {sorted(labels)})")
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            for v in values:
                if not re.fullmatch(r"[\w.-]+", v):
                    p.append(f"{label}{op}{value!r}: only plain alternatives are checked")
                elif name == "up":
                    if label == "job" and v != job:
                        p.append(f'up{{job="{v}"}}: the PodMonitor gives job="{job}"')
                elif label == "decision" and v not in repo.kinds:
                    p.append(f"decision {v!r} is no decision kind in "
                             "src/dataplane/denial.rs")
                elif v not in repo.strings:
                    p.append(f"{label}={v!r} is no string latchkey's source holds")
    # Every metric name, with or without matchers.
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])\s*(\()?", names_only):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        used.add(name)
        if name != "up" and name not in repo.metrics:
            p.append(f"metric {name!r} is not one latchkey exports "
                     f"(src/telemetry/metrics.rs)")
    # Grouping labels: on the metrics the expression uses.
    known = set()
    for name in used:
        known |= TARGET_LABELS if name == "up" else repo.metrics.get(name, set())
    grouped = set()
    for m in re.finditer(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        for label in filter(None, (x.strip() for x in m.group(2).split(","))):
            grouped.add(label)
            if label not in known:
                p.append(f"{m.group(1)} ({label}): no metric in the expression has it")
    return p, used, grouped


def check_monitoring(o, repo):
    p = Problems()
    objects = [x for x in o.objects if str(x.get("apiVersion", "")).startswith(MONITORING_GROUP)]
    if not objects and o.name not in EXPECTED_CHANNEL:
        return p  # an overlay of your own that leaves monitoring out
    monitors = [x for x in objects if x["kind"] == "PodMonitor"]
    rules = [x for x in objects if x["kind"] == "PrometheusRule"]
    for x in objects:
        if x["apiVersion"] != "monitoring.coreos.com/v1" or \
                x["kind"] not in ("PodMonitor", "PrometheusRule"):
            p.add(f"{x['apiVersion']} {x['kind']}: no check for it here, and the schema "
                  "check skips the group")
    if "/metrics" not in repo.routes:
        p.add("src/control/health.rs serves no /metrics")
    if len(monitors) != 1 or len(rules) != 1:
        p.add(f"expected one PodMonitor and one PrometheusRule, found {len(monitors)} and "
              f"{len(rules)}")
    jobs = set()
    for pm in monitors:
        where = f"PodMonitor/{pm['metadata']['name']}"
        spec = pm.get("spec") or {}
        for key in set(spec) - PODMONITOR_SPEC:
            p.add(f"{where}: unknown field spec.{key}")
        if spec.get("namespaceSelector"):
            p.add(f"{where}: a namespaceSelector is not checked here")
        pods = [pod for pod in o.pods if pod.namespace == pm["metadata"].get("namespace")
                and selects(spec.get("selector"), pod.labels)]
        if not pods:
            p.add(f"{where}: its selector matches no pod")
        for pod in pods:
            c = pod.container("latchkey")
            if c is None:
                p.add(f"{where}: selects {pod.name}, which runs no latchkey")
                continue
            _, addr = latchkey_addr(c, "LATCHKEY_HTTP_ADDR", repo)
            for ep in spec.get("podMetricsEndpoints") or []:
                for key in set(ep) - POD_ENDPOINT:
                    p.add(f"{where}: unknown field podMetricsEndpoints[].{key}")
                port = named_port(c, ep.get("port", ep.get("portNumber")))
                if addr is None or port != addr[1]:
                    p.add(f"{where}: scrapes port {ep.get('port')!r} ({port}) of {pod.name}; "
                          f"LATCHKEY_HTTP_ADDR listens on {addr and addr[1]}")
                if ep.get("path", "/metrics") != "/metrics":
                    p.add(f"{where}: scrapes {ep.get('path')}, latchkey serves /metrics")
                if not allowed_by_policies(o, pod, {"containerPort": port,
                                                    "name": ep.get("port")}):
                    p.add(f"{where}: no NetworkPolicy admits Prometheus to port {port}")
            if not spec.get("podMetricsEndpoints"):
                p.add(f"{where}: no podMetricsEndpoints")
            jobs.add(pod.labels.get(spec["jobLabel"]) if spec.get("jobLabel") else
                     f"{pm['metadata'].get('namespace')}/{pm['metadata']['name']}")
    if None in jobs or len(jobs) > 1:
        p.add(f"PodMonitor: the pods give job names {sorted(map(str, jobs))}")
    job = next(iter(jobs), None)
    names = []
    for pr in rules:
        where = f"PrometheusRule/{pr['metadata']['name']}"
        groups = (pr.get("spec") or {}).get("groups") or []
        if not groups:
            p.add(f"{where}: no groups")
        for group in groups:
            for key in set(group) - RULE_GROUP:
                p.add(f"{where}: unknown field groups[].{key}")
            if not group.get("name") or not group.get("rules"):
                p.add(f"{where}: a group without name or rules")
            for rule in group.get("rules") or []:
                alert = rule.get("alert")
                at = f"{where}: {alert or rule.get('record') or '(unnamed)'}"
                for key in set(rule) - RULE:
                    p.add(f"{at}: unknown field {key}")
                if not alert:
                    p.add(f"{at}: only alerting rules are expected")
                    continue
                names.append(alert)
                if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", alert):
                    p.add(f"{at}: alert names are CamelCase")
                for key in ("for", "keep_firing_for"):
                    if key in rule and not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+",
                                                        str(rule[key])):
                        p.add(f"{at}: {key} {rule[key]!r} is no duration")
                severity = (rule.get("labels") or {}).get("severity")
                if severity not in ("critical", "warning", "info"):
                    p.add(f"{at}: severity {severity!r}, expected critical, warning or info")
                annotations = rule.get("annotations") or {}
                for key in ("summary", "description"):
                    if not annotations.get(key):
                        p.add(f"{at}: no {key} annotation")
                expr = rule.get("expr")
                if not isinstance(expr, str) or not expr.strip():
                    p.add(f"{at}: no expr")
                    continue
                problem, parsed = promql_parse(expr)
                if problem:
                    p.add(f"{at}: {problem}")
                found, used, grouped = promql_problems(expr, repo, job)
                for problem in found:
                    p.add(f"{at}: {problem}")
                if not problem and parsed != used:
                    p.add(f"{at}: the parser finds metrics {sorted(parsed, key=str)}, this "
                          f"check read {sorted(used)}: teach k8s/render_test.py")
                # {{ $labels.x }} in the annotations: a label the alert's series carry.
                aggregated = re.search(r"\b(sum|avg|min|max|count|topk|bottomk|quantile|"
                                       r"absent)\b", expr)
                carried = set(grouped)
                if not aggregated:
                    for name in used:
                        carried |= repo.metrics.get(name, set()) | TARGET_LABELS
                for text in annotations.values():
                    for label in re.findall(r"\$labels\.(\w+)", str(text)):
                        if label not in carried:
                            p.add(f"{at}: the annotations use $labels.{label}, which the "
                                  "alert's series do not carry")
    for name in {n for n in names if names.count(n) > 1}:
        p.add(f"alert {name} is defined twice")
    for name in sorted(REQUIRED_ALERTS - set(names)):
        p.add(f"no alert {name}")
    return p


# ---------------------------------------------------------------- across the configs


def without(config, cluster_name):
    """An Envoy config without the data-plane cluster, the listeners' addresses and the
    module's socket path."""
    config = yaml.safe_load(yaml.safe_dump(config))
    for key, value in walk(config):
        if key == "http_filters" and isinstance(value, list):
            for f in value:
                if isinstance(f, dict) and f.get("name") == MODULE_FILTER:
                    f.get("typed_config", {}).get("filter_config", {}).pop("value", None)
    resources = config.get("static_resources") or {}
    resources["clusters"] = [c for c in resources.get("clusters") or []
                             if c.get("name") != cluster_name]
    for listener in resources.get("listeners") or []:
        listener.pop("address", None)
    return config


def differences(a, b, path="", limit=5):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key), b.get(key), f"{path}.{key}", limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]", limit)
    elif a != b:
        out.append(path or "(top)")
    return out[:limit]


def effective_envoy(shipped):
    c = dict(shipped.container)
    c.pop("volumeMounts", None)
    c["securityContext"] = {k: shipped.pod.security(shipped.container, k) for k in (
        "runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile",
        "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities", "privileged")}
    return c


def loosened(container):
    """An Envoy container without what loading the module changes (where Envoy finds it,
    the user it runs as): check_module judges those."""
    c = dict(container, securityContext=dict(container["securityContext"]))
    c["env"] = [e for e in c.get("env") or []
                if e.get("name") != "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] or None
    if c["env"] is None:
        c.pop("env")
    for k in ("runAsUser", "runAsGroup"):
        c["securityContext"].pop(k)
    return c


def check_across(overlays, repo):
    p = Problems()
    for o in overlays:
        source = LOCAL_CONFIG.get(o.name, "envoy/envoy.yaml")
        local = yaml.safe_load(read(repo.root, source))
        for shipped in o.envoys:
            clusters, _ = grpc_clusters(shipped.config)
            name = clusters[0].get("name") if clusters else "latchkey"
            for diff in differences(without(local, name), without(shipped.config, name)):
                p.add(f"{o.name}: its Envoy config differs from {source} at {diff} "
                      f"(only the listener address and cluster {name!r} may)")
    containers = [(o.name, effective_envoy(s), bool(module_filters(s.config)))
                  for o in overlays for s in o.envoys]
    for name, c, module in containers[1:]:
        first = containers[0][1]
        if module or containers[0][2]:
            first, c = loosened(first), loosened(c)
        for diff in differences(first, c):
            p.add(f"the envoy container differs between {containers[0][0]} and {name} "
                  f"at {diff}")
    return p


# ---------------------------------------------------------------- outputs


def write_outputs(o, certs):
    core = [x for x in o.objects if not str(x.get("apiVersion", "")).startswith(MONITORING_GROUP)]
    with open(os.path.join(o.directory, "core.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    if not o.envoys:
        return
    config = yaml.safe_load(o.envoys[0].text)

    def point(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "filename" and isinstance(v, str) and v not in IMAGE_FILES:
                    node[k] = os.path.join(certs, "tls.key" if v.endswith(".key") else "tls.crt")
                else:
                    point(v)
        elif isinstance(node, list):
            for v in node:
                point(v)

    point(config)
    with open(os.path.join(o.directory, "envoy.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)


class Repo:
    def __init__(self, root):
        self.root = root
        self.version = cargo_version(root)
        self.envoy = envoy_version(root)
        self.defaults = serve_defaults(root)
        self.routes = health_routes(root)
        self.metrics = exported_metrics(root)
        self.kinds = decision_kinds(root)
        self.strings = rust_strings(root)


CHECKS = [
    ("images", check_images),
    ("namespace", check_namespace),
    ("pod security restricted", check_restricted),
    ("probes", check_probes),
    ("ports, Services, NetworkPolicies", check_ports),
    ("data-plane channel", check_channel),
    ("in-process module", check_module),
    ("mounted files", check_files),
    ("replicas and disruption budgets", check_disruptions),
    ("monitoring", check_monitoring),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--certs", required=True)
    parser.add_argument("overlays", nargs="+", help="NAME=DIR, DIR holding rendered.yaml")
    args = parser.parse_args()
    repo = Repo(args.repo)
    failed = False

    def report(title, problems):
        nonlocal failed
        if problems:
            failed = True
            print(f"FAIL  {title}")
            for problem in problems:
                print(f"      {problem}")
        else:
            print(f"ok    {title}")

    overlays = []
    for spec in args.overlays:
        name, _, directory = spec.partition("=")
        with open(os.path.join(directory, "rendered.yaml"), encoding="utf-8") as f:
            objects = [x for x in yaml.safe_load_all(f) if x]
        o = Overlay(name, directory, objects)
        problems = Problems()
        for pod, c in o.envoy_pods():
            shipped = envoy_config(objects, pod, c, problems)
            if shipped:
                o.envoys.append(shipped)
        write_outputs(o, args.certs)
        report(f"render k8s/overlays/{name}: Envoy config mounted from its ConfigMap",
               problems)
        for title, check in CHECKS:
            report(f"render k8s/overlays/{name}: {title}", check(o, repo))
        overlays.append(o)
    report("render: Envoy containers and configs agree (overlays, envoy/envoy.yaml)",
           check_across(overlays, repo))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
