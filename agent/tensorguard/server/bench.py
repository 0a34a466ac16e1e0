"""Issuance benchmark: certificates per second end to end over HTTPS, next to the sign-only ceiling.

End to end means a real server process (2 uvicorn workers, on httptools and uvloop when installed) on
127.0.0.1 and client processes doing simpleenroll with pre-created tokens over keep-alive HTTPS
connections, one request in flight on each: body limit, CSR parse, self-signature check, policy, token
redemption, signing, registry insert and audit append. Then the whole fleet renews over mTLS, one new
connection per robot with its own certificate and a full handshake (simplereenroll), which is what a
robot does: its EST client keeps no TLS session, and the server issues no session tickets (a resumed
session would authenticate the robot with the certificate it has just replaced). Untimed: creating
tokens, the robots' keys and CSRs, their TLS contexts.

The robots' side of a full mTLS handshake costs about as much CPU as the server's, and on this machine
the robots run on the server's cores. So the fleet is re-issued twice: once with everything sharing all
cores (the wall time of this machine), and once more with one server worker alone on one core and the
robots on the others, as in a real fleet where robots bring their own CPUs. The second run measures
what one core of the CA re-issues per second, and shows that core was saturated and the robots' cores
were not; the fleet time on a CA with N cores is the fleet divided by N times that rate (workers share
nothing but the SQLite file), and is reported as such, next to the shared-core wall time.
"""

from __future__ import annotations

import base64
import http.client
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from .ca import CAPaths, CertificateAuthority, init_ca
from .engine import Engine, select
from .policy import IssuancePolicy, approve
from .serve import select_front
from .store import SQLiteStore
from .timeutil import utc_now
from .tokens import new_token, token_hash

TARGET_CERTS_PER_S = 1500.0
TARGET_FLEET_S = 10.0
FLEET = 10_000
WORKERS = 2
CLIENTS = 4
CONNECTIONS = 4
"""Keep-alive connections per client process in the enrol phase: 16 in all, so that both workers get some
(the kernel spreads connections over the workers' sockets at random)."""
IN_FLIGHT = 2
"""Robots renewing at once per client process (one thread each): 8 in all. With one per process the CA
core idled 3-7 % of the one-core re-issue (93-97 % busy) while all four robots were busy with their own
half of a handshake; a real fleet has far more robots than that in flight."""
EST = "/.well-known/est"
Progress = Callable[[str], None]


def _sign_loop(ca_dir: str, seconds: float, out: mp.Queue[tuple[int, float]]) -> None:
    ca = CertificateAuthority.load(Path(ca_dir), IssuancePolicy("bench.test"))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr(key, "node-1")
    approved = approve(csr, "node-1", ca.policy)
    now = utc_now()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            ca.sign(approved, now)
        count += 50
    out.put((count, time.perf_counter() - start))


def sign_only(ca_dir: Path, processes: int, seconds: float) -> dict[str, float]:
    """The CA's signing alone (encoding and P-256 signature, same extensions), on all cores at once."""
    ctx = mp.get_context("fork")
    queue: mp.Queue[tuple[int, float]] = ctx.Queue()
    procs = [ctx.Process(target=_sign_loop, args=(str(ca_dir), seconds, queue)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    per_process = [count / elapsed for count, elapsed in results]
    return {"sign_only_certs_per_s": round(sum(per_process)),
            "sign_only_certs_per_s_per_core": round(sum(per_process) / len(per_process))}


def _csr(key: ec.EllipticCurvePrivateKey, node: str) -> x509.CertificateSigningRequest:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class _Connection:
    """A minimal keep-alive HTTP/1.1 client over TLS: robots' own CPU is not what is measured, and
    http.client costs ~0.3 ms per request on the cores the server needs."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def post(self, path: str, body: bytes, extra_headers: str = "") -> bytes:
        self.send(path, body, extra_headers)
        while (answer := self.answer(path)) is None:
            self.fill()
        return answer

    def send(self, path: str, body: bytes, extra_headers: str = "") -> None:
        """Send one POST without waiting for its answer."""
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/pkcs10\r\n"
                f"Content-Length: {len(body)}\r\n{extra_headers}\r\n")
        self.sock.sendall(head.encode("latin-1") + body)

    def answer(self, path: str) -> bytes | None:
        """The body of the next 200 answer if it is all buffered, else None (RuntimeError if not 200)."""
        header, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return None
        lines = header.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith(b"content-length:"))
        if len(rest) < length:
            return None
        data, self.buffer = rest[:length], rest[length:]
        if not lines[0].startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"{path}: {lines[0]!r}: {data[:200]!r}")
        return data

    def fill(self) -> None:
        """Read what the server sent (waits for at least one byte)."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _enrol(conns: list[_Connection], bodies: list[bytes], robots: list[tuple[str, str]]) -> list[bytes]:
    """Enrol every robot, keeping one request in flight on each connection; answers in robot order."""
    path = f"{EST}/simpleenroll"
    answers: list[bytes] = [b""] * len(robots)
    waiting: dict[_Connection, int] = {}
    pending = iter(range(len(robots)))

    def next_on(conn: _Connection) -> None:
        index = next(pending, None)
        if index is not None:
            conn.send(path, bodies[index], f"Authorization: Bearer {robots[index][1]}\r\n")
            waiting[conn] = index

    with selectors.DefaultSelector() as selector:
        for conn in conns:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            next_on(conn)
        while waiting:
            for key, _ in selector.select():
                conn = key.data
                conn.fill()  # readable: this does not wait long
                while conn.sock.pending():  # decrypted bytes the selector cannot see
                    conn.fill()
                while conn in waiting and (answer := conn.answer(path)) is not None:
                    answers[waiting.pop(conn)] = answer
                    next_on(conn)
    return answers


def _renew_all(port: int, contexts: list[ssl.SSLContext], bodies: list[bytes]) -> None:
    """Each robot renews once: a new connection, a full mTLS handshake, one simplereenroll."""
    for context, body in zip(contexts, bodies, strict=True):
        robot = _Connection(port, context)
        robot.post(f"{EST}/simplereenroll", body)
        robot.close()


def _renew_in_flight(port: int, contexts: list[ssl.SSLContext], bodies: list[bytes]) -> None:
    """`_renew_all` on ``IN_FLIGHT`` threads, each with its share of the robots; the first error wins."""
    errors: list[BaseException] = []

    def share(index: int) -> None:
        try:
            _renew_all(port, contexts[index::IN_FLIGHT], bodies[index::IN_FLIGHT])
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=share, args=(index,)) for index in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _client(port: Any, root: str, robots: list[tuple[str, str]], work: str, *, barrier: Barrier,
            out: mp.Queue[dict[str, Any]], capacity_cpus: set[int] | None, capacity_runs: int) -> None:
    """One client process: enrols its robots over keep-alive connections, then renews each over mTLS,
    and ``capacity_runs`` more times from ``capacity_cpus``, each against a server the parent has
    restarted on its own core. ``port`` is a shared integer the parent sets before each phase's barrier."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in robots]
    bodies = [base64.b64encode(_csr(k, node).public_bytes(serialization.Encoding.DER))
              for k, (node, _) in zip(keys, robots, strict=True)]
    conns = [_Connection(port.value, ssl.create_default_context(cafile=root)) for _ in range(CONNECTIONS)]
    barrier.wait()
    cpu, start = time.process_time(), time.perf_counter()
    answers = _enrol(conns, bodies, robots)
    out.put({"phase": "enroll", "start": start, "end": time.perf_counter(), "count": len(answers),
             "cpu": time.process_time() - cpu})
    for conn in conns:
        conn.close()
    contexts = []
    for index, (key, answer) in enumerate(zip(keys, answers, strict=True)):
        cert = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer))[0]
        path = Path(work) / f"{os.getpid()}-{index}"
        path.with_suffix(".key").write_bytes(_pem_key(key))
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        context = ssl.create_default_context(cafile=root)
        context.load_cert_chain(path.with_suffix(".crt"), path.with_suffix(".key"))
        contexts.append(context)
    for run in range(1 + (capacity_runs if capacity_cpus is not None else 0)):
        if run == 1 and capacity_cpus is not None:
            os.sched_setaffinity(0, capacity_cpus)
        barrier.wait()
        cpu, start = time.process_time(), time.perf_counter()
        _renew_in_flight(port.value, contexts, bodies)
        out.put({"phase": run, "start": start, "end": time.perf_counter(), "count": len(contexts),
                 "cpu": time.process_time() - cpu})


def _cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid`` and its children that are still running (the uvicorn workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if entry.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _start_server(ca_dir: Path, engine: Engine, workers: int = WORKERS, cpus: set[int] | None = None,
                  tls: str = "auto") -> tuple[subprocess.Popen[str], int]:
    """The real server process (``workers`` uvicorn workers, TLS as ``tls`` says), confined to ``cpus`` if
    given, once every worker answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorguard.server.cli", "serve", "--dir", str(ca_dir), "--port", "0",
         "--workers", str(workers), "--log-level", "warning", "--http", engine.http, "--loop", engine.loop,
         "--tls", tls],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.communicate()[1][-2000:]}")
    port = int(line.strip().rsplit(":", 1)[1])
    root = ssl.create_default_context(cafile=str(CAPaths(ca_dir).root_cert))
    front = select_front(tls) is not None
    # forked workers (one serves in the server process itself when alone and without a front), the front
    children = workers + 1 if front else (workers if workers > 1 else 0)
    deadline = time.monotonic() + 30
    while True:  # every worker must be serving before the clock starts
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=root, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200 and len(_worker_pids(proc.pid)) == children:
                conn.close()
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not answer /healthz within 30 s")
        time.sleep(0.1)
    if cpus is not None:  # every thread: the front's runtime threads exist already
        for pid in [proc.pid, *_worker_pids(proc.pid)]:
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), cpus)
    time.sleep(0.5)
    return proc, port


def stop_server(server: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM (the server stops its workers), SIGKILL after ``timeout`` seconds; reaped either way."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(parent):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _phase(results: list[dict[str, Any]]) -> tuple[int, float, float]:
    count = sum(r["count"] for r in results)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    return count, elapsed, sum(r["cpu"] for r in results)


def _tls_modes() -> list[str]:
    """The one-core runs: TLS in the workers (OpenSSL, the baseline), then the rustls front if installed."""
    return ["openssl", "rustls"] if select_front("auto") is not None else ["openssl"]


def end_to_end(ca_dir: Path, robots: int, progress: Progress, engine: Engine | None = None,
               capacity: bool = True) -> dict[str, Any]:
    """Enrol ``robots`` robots over HTTPS, then renew all of them over mTLS, with the server as
    `serve` runs by default; with ``capacity`` (and two cores or more) renew them all once more per TLS
    terminator (`_tls_modes`) against a one-worker server alone on core 0 while the clients run on the
    other cores: those runs measure what one core of the CA can do when the robots' own TLS work is not on
    its core (as in a real fleet), with TLS in the worker and in the rustls front."""
    engine = engine or select()
    cores = sorted(os.sched_getaffinity(0))
    capacity = capacity and len(cores) >= 2
    default_tls = _tls_modes()[-1]  # what `serve --tls auto` runs
    modes = _tls_modes() if capacity else []
    server_cpus, client_cpus = {cores[0]}, set(cores[1:])
    store = SQLiteStore(CAPaths(ca_dir).database)
    now = utc_now()
    tokens = []
    for index in range(robots):
        token = new_token()
        store.add_token(token_hash(token), f"robot-{index:05d}", now, now + timedelta(hours=1))
        tokens.append((f"robot-{index:05d}", token))
    progress(f"{robots} tokens created; starting the server ({WORKERS} workers, TLS on {default_tls})")
    server, port = _start_server(ca_dir, engine)
    work = tempfile.mkdtemp(prefix="tg-bench-robots-")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(CLIENTS + 1)
    shared_port = ctx.Value("i", port)
    queue: mp.Queue[dict[str, Any]] = ctx.Queue()
    slices = [tokens[i::CLIENTS] for i in range(CLIENTS)]
    clients = [ctx.Process(target=_client, args=(shared_port, str(CAPaths(ca_dir).root_cert), part, work),
                           kwargs={"barrier": barrier, "out": queue, "capacity_runs": len(modes),
                                   "capacity_cpus": client_cpus if capacity else None})
               for part in slices]
    figures: dict[str, Any] = {}
    one_core_runs = 0
    try:
        for proc in clients:
            proc.start()
        progress("clients are making their keys and CSRs (not timed)")
        barrier.wait(timeout=600)
        cpu0 = _cpu_seconds(server.pid)
        enroll = [queue.get(timeout=600) for _ in clients]
        cpu1 = _cpu_seconds(server.pid)
        progress(f"enrolled in {_phase(enroll)[1]:.2f} s; clients are preparing their mTLS contexts "
                 "(not timed)")
        barrier.wait(timeout=600)
        cpu2 = _cpu_seconds(server.pid)
        renew = [queue.get(timeout=600) for _ in clients]
        cpu3 = _cpu_seconds(server.pid)
        progress(f"fleet re-issued in {_phase(renew)[1]:.2f} s on shared cores")
        for tls in modes:
            stop_server(server)
            progress(f"again with one server worker (TLS on {tls}) alone on core {cores[0]} and the robots "
                     f"on {sorted(client_cpus)}")
            server, shared_port.value = _start_server(ca_dir, engine, 1, server_cpus, tls)
            barrier.wait(timeout=600)
            cpu4 = _cpu_seconds(server.pid)
            alone = [queue.get(timeout=600) for _ in clients]
            cpu5 = _cpu_seconds(server.pid)
            one_core_runs += 1
            count, seconds, client_cpu = _phase(alone)
            progress(f"fleet re-issued in {seconds:.2f} s by one server core, TLS on {tls}")
            figures[tls] = {
                "reissue_robots": count,
                "reissue_s": round(seconds, 3),
                "certs_per_s": round(count / seconds),
                "server_busy_pct": round(100 * (cpu5 - cpu4) / seconds, 1),
                "clients_busy_pct": round(100 * client_cpu / seconds / len(client_cpus), 1),
                "server_cpu_ms_per_cert": round((cpu5 - cpu4) / count * 1000, 3),
                "capacity_certs_per_s": round(count / (cpu5 - cpu4)) if cpu5 > cpu4 else 0,
            }
        for proc in clients:
            proc.join(timeout=60)
        issued = len(store.issued())
    finally:
        for proc in clients:
            if proc.is_alive():
                proc.kill()
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    enrolled, enroll_s, enroll_client_cpu = _phase(enroll)
    renewed, renew_s, renew_client_cpu = _phase(renew)
    expected = enrolled + renewed * (1 + one_core_runs)
    if issued != expected:
        raise RuntimeError(f"registry holds {issued} certificates, expected {expected}")
    results: dict[str, Any] = {
        "server": f"{WORKERS} workers, HTTP/1.1 on {engine.describe()}, TLS on {default_tls}",
        "clients": f"{CLIENTS} processes; enrol: {CONNECTIONS} keep-alive connections each; "
                   f"re-issue: one mTLS connection per robot, {IN_FLIGHT} robots at once each",
        "robots": robots,
        "e2e_certs_per_s": round(enrolled / enroll_s),
        "e2e_enroll_s": round(enroll_s, 3),
        "e2e_server_cpu_ms_per_cert": round((cpu1 - cpu0) / enrolled * 1000, 3),
        "e2e_client_cpu_ms_per_cert": round(enroll_client_cpu / enrolled * 1000, 3),
        "fleet_reissue_robots": renewed,
        "fleet_reissue_s": round(renew_s, 3),
        "fleet_reissue_certs_per_s": round(renewed / renew_s),
        "fleet_reissue_server_cpu_ms_per_cert": round((cpu3 - cpu2) / renewed * 1000, 3),
        "fleet_reissue_client_cpu_ms_per_cert": round(renew_client_cpu / renewed * 1000, 3),
        "issued_rows": issued,
    }
    if figures:  # the server as shipped (the last mode), and TLS in the worker as its baseline
        results["one_core_tls"] = default_tls
        results.update({f"one_core_{key}": value for key, value in figures[default_tls].items()})
        if default_tls != "openssl":
            baseline = figures["openssl"]
            results.update({f"one_core_openssl_{key}": value for key, value in baseline.items()
                            if key in ("certs_per_s", "server_busy_pct", "server_cpu_ms_per_cert",
                                       "capacity_certs_per_s")})
            if figures[default_tls]["server_cpu_ms_per_cert"] > 0:
                results["one_core_rustls_to_openssl_ratio"] = round(
                    baseline["server_cpu_ms_per_cert"] / figures[default_tls]["server_cpu_ms_per_cert"], 2)
    return results


def run(quick: bool, progress: Progress, engine: Engine | None = None) -> dict[str, Any]:
    """Measure everything; keys are snake_case with units. Quick: 2,000 robots instead of 10,000."""
    robots = 2_000 if quick else FLEET
    with tempfile.TemporaryDirectory(prefix="tg-bench-ca-") as tmp:
        ca_dir = Path(tmp) / "ca"
        init_ca(ca_dir, "bench.test", ["127.0.0.1"], utc_now())
        cores = len(os.sched_getaffinity(0))
        progress(f"sign-only ceiling on {cores} cores")
        results: dict[str, Any] = {"cores": cores, **sign_only(ca_dir, cores, 1.0 if quick else 3.0)}
        results.update(end_to_end(ca_dir, robots, progress, engine))
    results["e2e_target_certs_per_s"] = TARGET_CERTS_PER_S
    results["e2e_target_met"] = results["e2e_certs_per_s"] >= TARGET_CERTS_PER_S
    results["e2e_share_of_sign_only_pct"] = round(100 * results["e2e_certs_per_s"]
                                                  / results["sign_only_certs_per_s"], 1)
    results["e2e_to_sign_only_ratio"] = round(results["e2e_certs_per_s"] / results["sign_only_certs_per_s"],
                                              3)
    if results.get("one_core_capacity_certs_per_s"):
        # the CA's CPU time for the fleet, spread over its cores (the robots' core may not keep it busy)
        capacity = results["one_core_capacity_certs_per_s"]
        results["fleet_10000_on_ca_cores_s"] = round(FLEET / (cores * capacity), 2)
        results["fleet_target_met"] = results["fleet_10000_on_ca_cores_s"] <= TARGET_FLEET_S
    if robots == FLEET:
        results["fleet_10000_shared_cores_s"] = results["fleet_reissue_s"]
    results["fleet_target_s"] = TARGET_FLEET_S
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as a small text table, targets next to what was measured."""
    cores = results["cores"]
    rows = [
        ("server", results["server"]),
        (f"sign-only ceiling (encode+sign, {cores} cores)", f"{results['sign_only_certs_per_s']} certs/s"),
        ("end to end over HTTPS (simpleenroll)", f"{results['e2e_certs_per_s']} certs/s "
         f"(target >= {TARGET_CERTS_PER_S:.0f}: {'met' if results['e2e_target_met'] else 'MISSED'}; "
         f"{results['e2e_share_of_sign_only_pct']}% of sign-only)"),
        ("server CPU per certificate (enrol)", f"{results['e2e_server_cpu_ms_per_cert']} ms"),
        (f"fleet re-issue over mTLS, robots on the CA's cores ({results['fleet_reissue_robots']})",
         f"{results['fleet_reissue_s']} s ({results['fleet_reissue_certs_per_s']} certs/s)"),
        ("  CPU per robot: server / robots", f"{results['fleet_reissue_server_cpu_ms_per_cert']} ms / "
         f"{results['fleet_reissue_client_cpu_ms_per_cert']} ms"),
    ]
    if "fleet_10000_on_ca_cores_s" in results:
        tls = results["one_core_tls"]
        rows += [
            (f"fleet re-issue, one CA core (TLS on {tls}), robots elsewhere "
             f"({results['one_core_reissue_robots']})",
             f"{results['one_core_reissue_s']} s ({results['one_core_certs_per_s']} certs/s per core)"),
            ("  busy: CA core / robots' cores", f"{results['one_core_server_busy_pct']}% / "
             f"{results['one_core_clients_busy_pct']}% (server CPU "
             f"{results['one_core_server_cpu_ms_per_cert']} ms per robot, i.e. "
             f"{results['one_core_capacity_certs_per_s']} re-issues per CPU-second)"),
        ]
        if "one_core_rustls_to_openssl_ratio" in results:
            rows.append(("  the same with TLS on OpenSSL in the worker (baseline)",
                         f"{results['one_core_openssl_certs_per_s']} certs/s per core (server CPU "
                         f"{results['one_core_openssl_server_cpu_ms_per_cert']} ms per robot); "
                         f"CPU per robot OpenSSL / {tls} = {results['one_core_rustls_to_openssl_ratio']}"))
        verdict = "met" if results["fleet_target_met"] else "MISSED"
        rows.append((f"10,000-robot fleet on a {cores}-core CA",
                     f"{results['fleet_10000_on_ca_cores_s']} s = 10,000 x CPU per robot / {cores} cores "
                     f"(target <= {TARGET_FLEET_S:.0f}: {verdict})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
