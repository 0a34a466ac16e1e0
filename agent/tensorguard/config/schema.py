"""The agent's configuration schema: every key, its type, default, allowed range and meaning.

This module is declarative data only; loading, merging and error formatting live in loader.py.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_NODE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_GROUP = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _absolute_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError("must be an absolute path")
    return value


def _absolute_path_or_empty(value: str) -> str:
    return value if value == "" else _absolute_path(value)


def _ifname(value: str) -> str:
    if not _IFNAME.match(value) or value in {".", ".."}:
        raise ValueError("must be a network interface name (1-15 characters, no '/', ':' or space)")
    return value


def _node_id(value: str) -> str:
    if not _NODE_ID.match(value):
        raise ValueError("must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'")
    return value


def _dns_name(value: str) -> str:
    if not _DNS_NAME.match(value):
        raise ValueError("must be a lower-case DNS name such as 'fleet.example.com'")
    return value


def _group(value: str) -> str:
    if not _GROUP.match(value):
        raise ValueError("must be a POSIX group name")
    return value


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("must be an https:// URL with a host name")
    return value


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port in 1..65535")
    return value


def _prefix(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"must be an IP prefix such as 10.203.0.0/16 or fd00::/64 ({exc})") from None


def _port_range(value: str) -> str:
    low, sep, high = value.partition("-")
    ok = low.isdigit() and (not sep or high.isdigit())
    if ok:
        lo, hi = int(low), int(high) if sep else int(low)
        ok = 1 <= lo <= hi <= 65535
    if not ok:
        raise ValueError("must be a port or a range LOW-HIGH within 1..65535")
    return value


def _unit_name(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9:_.\\@-]+\.(service|scope|slice)$", value):
        raise ValueError("must be a systemd unit name ending in .service, .scope or .slice")
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
AbsolutePathOrEmpty = Annotated[str, AfterValidator(_absolute_path_or_empty)]
InterfaceName = Annotated[str, AfterValidator(_ifname)]
NodeId = Annotated[str, AfterValidator(_node_id)]
DnsName = Annotated[str, AfterValidator(_dns_name)]
GroupName = Annotated[str, AfterValidator(_group)]
HttpsUrl = Annotated[str, AfterValidator(_https_url)]
HostPort = Annotated[str, AfterValidator(_host_port)]
Prefix = Annotated[str, AfterValidator(_prefix)]
PortRange = Annotated[str, AfterValidator(_port_range)]
UnitName = Annotated[str, AfterValidator(_unit_name)]


def setting(default: Any, doc: str, *, allowed: str | None = None, **constraints: Any) -> Any:
    """Declare a key with its documentation so the example config and README are generated."""
    extra: dict[str, Any] = {"allowed": allowed} if allowed else {}
    return Field(default, description=doc, json_schema_extra=extra or None, **constraints)


class Section(BaseModel):
    """Base for config tables: unknown keys and type coercion are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ControlSettings(Section):
    """The Unix-socket control API every unit serves."""

    max_frame_bytes: int = setting(
        1_048_576,
        "Largest request line accepted on a control socket; a longer one is answered with an "
        "error and skipped.",
        ge=1024,
        le=16 * 1024 * 1024,
    )
    client_timeout_s: float = setting(
        30.0, "A client that sends no complete request for this long is disconnected.", gt=0, le=3600
    )
    max_clients: int = setting(
        64, "Concurrent connections per unit; further clients are refused.", ge=1, le=4096
    )
    group: GroupName = setting(
        "tensorguard",
        "Members of this group (and root) may call every method on the sockets.",
        allowed="a POSIX group name",
    )
    read_only_public: bool = setting(
        False,
        "Let every local user call read-only methods (status, health, version, config.show). The "
        "socket is then created world-accessible; the peer-credential check still guards the "
        "other methods.",
    )


class AgentSettings(Section):
    """Settings shared by the three units."""

    node_id: NodeId | None = setting(
        None,
        "This robot's node identifier, used in its SPIFFE ID and in metrics. Unset: the host name.",
        allowed="1-63 characters of a-z, 0-9 and '-'",
    )
    socket_dir: AbsolutePath = setting(
        "/run/tensorguard",
        "Directory holding the units' control sockets (netguard.sock, identity.sock, fl.sock).",
        allowed="an absolute path",
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "Least severe log message written to the journal."
    )
    metrics_dir: AbsolutePathOrEmpty = setting(
        "/var/lib/prometheus/node-exporter",
        "node-exporter textfile-collector directory that receives tensorguard_<unit>.prom; "
        "empty disables metrics.",
        allowed='an absolute path or ""',
    )
    metrics_interval_s: float = setting(
        15.0, "Seconds between two metrics writes.", ge=1, le=3600
    )
    control: ControlSettings = ControlSettings()


class FrontSettings(Section):
    """FRONT's parameters (Gong & Wang 2020)."""

    max_dummies: int = setting(
        1700, "Largest padding budget per direction and trace; each trace draws 1..this many.",
        ge=0, le=100_000)
    window_min_s: float = setting(
        1.0, "Smallest Rayleigh window (seconds) a trace may draw.", gt=0, le=600)
    window_max_s: float = setting(
        14.0, "Largest Rayleigh window (seconds) a trace may draw.", gt=0, le=600)
    trace_gap_s: float = setting(
        5.0, "Seconds of silence after which the next packet starts a new trace.", gt=0, le=3600)

    @model_validator(mode="after")
    def _window_order(self) -> FrontSettings:
        if self.window_min_s > self.window_max_s:
            raise ValueError("window_min_s must be <= window_max_s")
        return self


class RegulatorSettings(Section):
    """The rate-regulation defence's parameters (after Holland & Hopper 2022)."""

    decay: float = setting(0.9, "Per-second decay factor of the surge rate.", gt=0, lt=1)
    min_rate_hz: float = setting(
        10.0, "Rate below which padding stops and held packets drain.", gt=0, le=100_000)
    surge_threshold: int = setting(
        4, "Held packets beyond which a new surge starts at rate_hz.", ge=1, le=10_000)


class WtfPadSettings(Section):
    """WTF-PAD's parameters (Juarez et al. 2016)."""

    histograms: AbsolutePath | None = setting(
        None, "JSON file with the burst and gap histograms learned from undefended traces; "
        "required when kind = \"wtfpad\".", allowed="an absolute path")


class DefenceSettings(Section):
    """Which traffic-analysis defence shapes protected flows, and its cost limits."""

    kind: Literal["none", "cbr", "front", "wtfpad", "regulator"] = setting(
        "none", "Defence machine applied to protected flows."
    )
    rate_hz: float = setting(
        50.0, "Packet slots per second of the constant-rate and rate-regulation defences.",
        gt=0, le=100_000,
    )
    max_padding_fraction: float = setting(
        0.5, "Upper bound on the share of sent bytes that are padding.", ge=0, le=0.95
    )
    max_added_delay_ms: float = setting(
        50.0, "Upper bound on the delay the defence may add to one packet.", ge=0, le=10_000
    )
    burst: int = setting(1, "Packets the constant-rate defence may release in one slot.", ge=1, le=64)
    pad: bool = setting(False, "Constant-rate defence: fill empty slots with dummies (within the "
                        "padding cap).")
    dummy_size: int = setting(512, "Payload bytes of one dummy packet.", ge=1, le=1472)
    discard: HostPort | None = setting(
        None, "Where pace mode sends dummy packets: a discard service on the peer (UDP). Unset: "
        "no dummies are sent (the defences then shape timing only).", allowed="HOST:PORT")
    front: FrontSettings = FrontSettings()
    regulator: RegulatorSettings = RegulatorSettings()
    wtfpad: WtfPadSettings = WtfPadSettings()

    @model_validator(mode="after")
    def _consistent(self) -> DefenceSettings:
        if self.kind == "wtfpad" and self.wtfpad.histograms is None:
            raise ValueError('kind = "wtfpad" needs wtfpad.histograms (a learned histogram file)')
        if self.kind == "regulator" and self.regulator.min_rate_hz > self.rate_hz:
            raise ValueError("regulator.min_rate_hz must be <= rate_hz")
        return self


class ProtectedFlow(Section):
    """One selector of traffic to protect ([[network.protect]] tables)."""

    name: str = setting("flow", "Label used in stats and logs.", min_length=1, max_length=32,
                        pattern=r"^[A-Za-z0-9_.-]+$", allowed="1-32 characters of A-Z a-z 0-9 _ . -")
    destination: Prefix = setting("0.0.0.0/0", "Remote prefix the protected traffic goes to.",
                                  allowed="an IPv4 or IPv6 prefix")
    protocol: Literal["tcp", "udp", "any"] = setting("udp", "Transport protocol of the flow.")
    ports: PortRange | None = setting(
        None, "Remote port or LOW-HIGH range (tcp or udp only). Unset: all ports.",
        allowed="a port or LOW-HIGH")
    unit: UnitName | None = setting(
        None, "Only traffic sent by this systemd unit (matched by its cgroup). Unset: any sender.",
        allowed="a systemd unit name")

    @model_validator(mode="after")
    def _ports_need_a_protocol(self) -> ProtectedFlow:
        if self.ports is not None and self.protocol == "any":
            raise ValueError("ports need protocol = \"tcp\" or \"udp\"")
        return self


class NetworkSettings(Section):
    """netguard: traffic-analysis defence on the robot's uplink."""

    enabled: bool = setting(False, "Run the netguard datapath.")
    interfaces: list[InterfaceName] = setting(
        [], "Uplink interfaces whose traffic is observed and shaped.", allowed="interface names"
    )
    fail_mode: Literal["open", "closed"] = setting(
        "closed",
        "What happens to protected traffic when the shaper is not running: 'closed' drops it, "
        "'open' lets it through unshaped.",
    )
    netns: str | None = setting(
        None, "Network namespace (a name under /run/netns) whose interfaces netguard manages. "
        "Unset: the unit's own.", allowed="a namespace name", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    pin_dir: AbsolutePath = setting(
        "/sys/fs/bpf/tensorguard", "Where the eBPF maps are pinned (on a bpffs), one directory per "
        "interface.", allowed="an absolute path on a bpf file system")
    protect: list[ProtectedFlow] = setting(
        [], "Flows to protect, as [[network.protect]] tables.", allowed="tables of name, "
        "destination, protocol, ports, unit")
    defence: DefenceSettings = DefenceSettings()


_OCTAL_MODE = re.compile(r"^0?[0-7]{3}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SIGNALS = ("HUP", "USR1", "USR2", "TERM")


def _octal_mode(value: str) -> str:
    if not _OCTAL_MODE.match(value):
        raise ValueError("must be an octal file mode such as \"0640\"")
    if int(value, 8) & 0o137:
        raise ValueError("a key file must not be executable, group-writable or readable by others "
                         "(at most 0640)")
    return value


def _user(value: str) -> str:
    if not _USER.match(value):
        raise ValueError("must be a POSIX user or group name")
    return value


def _k8s_name(value: str) -> str:
    if not _K8S_NAME.match(value):
        raise ValueError("must be a Kubernetes object name (lower-case DNS subdomain)")
    return value


KeyMode = Annotated[str, AfterValidator(_octal_mode)]
UserName = Annotated[str, AfterValidator(_user)]
KubeName = Annotated[str, AfterValidator(_k8s_name)]


class IdentitySink(Section):
    """Where the certificate is installed for a service to use ([[identity.sink]] tables)."""

    name: str = setting("sink", "Label used in status, logs and the audit log.", min_length=1,
                        max_length=32, pattern=r"^[A-Za-z0-9_.-]+$",
                        allowed="1-32 characters of A-Z a-z 0-9 _ . -")
    kind: Literal["files", "kubernetes"] = setting(
        "files", "'files': cert.pem, key.pem, chain.pem and fullchain.pem in `directory`, swapped "
        "atomically; 'kubernetes': a kubernetes.io/tls Secret.")
    directory: AbsolutePath | None = setting(
        None, "files: directory that receives the files (created 0750 if absent).",
        allowed="an absolute path")
    owner: UserName | None = setting(None, "files: owner of the files. Unset: the unit's user.",
                                     allowed="a user name")
    group: UserName | None = setting(None, "files: group of the files. Unset: the unit's group.",
                                     allowed="a group name")
    key_mode: KeyMode = setting("0600", "files: mode of key.pem (certificates are 0644).",
                                allowed='octal, at most "0640"')
    reload_command: list[str] = setting(
        [], "Run after each install, e.g. [\"systemctl\", \"reload\", \"nginx.service\"]; "
        "no shell. Empty: none.", allowed="argv list")
    reload_signal: Literal["HUP", "USR1", "USR2", "TERM"] | None = setting(
        None, "Send this signal after each install to the process in `reload_pidfile`.",
        allowed=", ".join(_SIGNALS))
    reload_pidfile: AbsolutePath | None = setting(
        None, "Pid file of the process to signal.", allowed="an absolute path")
    namespace: KubeName = setting("default", "kubernetes: namespace of the Secret.",
                                  allowed="a Kubernetes name")
    secret: KubeName | None = setting(None, "kubernetes: name of the kubernetes.io/tls Secret.",
                                      allowed="a Kubernetes name")
    kubeconfig: AbsolutePath | None = setting(
        None, "kubernetes: kubeconfig file. Unset: in-cluster service account.",
        allowed="an absolute path")

    @model_validator(mode="after")
    def _complete(self) -> IdentitySink:
        if self.kind == "files" and self.directory is None:
            raise ValueError('kind = "files" needs directory')
        if self.kind == "kubernetes" and self.secret is None:
            raise ValueError('kind = "kubernetes" needs secret')
        if (self.reload_signal is None) != (self.reload_pidfile is None):
            raise ValueError("reload_signal and reload_pidfile go together")
        if self.reload_command and (not self.reload_command[0].startswith("/")
                                    and "/" in self.reload_command[0]):
            raise ValueError("reload_command[0] must be a program name or an absolute path")
        return self


class Pkcs11Settings(Section):
    """The key in a PKCS#11 token instead of a file (identity.key_store = "pkcs11")."""

    module: AbsolutePath = setting("/usr/lib/softhsm/libsofthsm2.so", "PKCS#11 module (.so).",
                                   allowed="an absolute path")
    token_label: str = setting("tensorguard", "Label of the token that holds the key.",
                               min_length=1, max_length=32)
    pin_file: AbsolutePath = setting("/etc/tensorguard/pkcs11-pin",
                                     "File holding the user PIN (mode 0600 or 0640).",
                                     allowed="an absolute path")


class IdentitySettings(Section):
    """identity: short-lived machine certificates."""

    enabled: bool = setting(False, "Enrol with the control plane and keep a certificate current.")
    server_url: HttpsUrl | None = setting(
        None, "Control plane (EST) base URL. Unset: no enrolment.", allowed="an https:// URL"
    )
    trust_anchor: AbsolutePath = setting(
        "/etc/tensorguard/ca.pem", "The fleet CA's root certificate(s) (PEM): the only trust "
        "anchor for the control plane's TLS certificate.", allowed="an absolute path")
    bootstrap_token_file: AbsolutePath = setting(
        "/var/lib/tensorguard/identity/bootstrap-token", "One-time enrolment token from "
        "`tensorguard server token create` (owner tensorguard, mode 0600); read only to enrol, "
        "removed once used (so it must be in a directory the unit can write).",
        allowed="an absolute path")
    trust_domain: DnsName = setting(
        "tensorguard.local",
        "SPIFFE trust domain: certificates name spiffe://<trust_domain>/robot/<node_id>.",
        allowed="a lower-case DNS name",
    )
    key_type: Literal["ecdsa-p256", "ed25519"] = setting(
        "ecdsa-p256", "Algorithm of the key generated on the robot."
    )
    key_store: Literal["file", "pkcs11"] = setting(
        "file", "Where the private key lives: a 0600 file in state_dir, or a PKCS#11 token.")
    renew_fraction: float = setting(
        0.5, "Renew when this fraction of the certificate lifetime has elapsed.", gt=0, lt=1
    )
    renew_jitter: float = setting(
        0.1, "Renew up to this fraction of the lifetime earlier, at random (never later).",
        ge=0, le=0.5
    )
    ca_backdate_s: float = setting(
        60.0, "How far the CA backdates notBefore (its --backdate): renewal timing reads the CA's "
        "clock from the certificate as notBefore + this.", ge=0, le=3600)
    retry_initial_s: float = setting(5.0, "First retry delay after a failed renewal.", ge=1, le=3600)
    retry_max_s: float = setting(
        300.0, "Longest retry delay (shrinks near expiry so several attempts remain).", ge=1, le=86400)
    state_dir: AbsolutePath = setting(
        "/var/lib/tensorguard/identity", "Where the key, certificate and audit log are kept.",
        allowed="an absolute path",
    )
    sink: list[IdentitySink] = setting(
        [], "Where certificates are installed, as [[identity.sink]] tables.",
        allowed="tables of name, kind, directory, owner, group, key_mode, reload_*, namespace, "
        "secret, kubeconfig")
    pkcs11: Pkcs11Settings = Pkcs11Settings()

    @model_validator(mode="after")
    def _consistent(self) -> IdentitySettings:
        if self.enabled and self.server_url is None:
            raise ValueError("enabled = true needs server_url")
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError("retry_initial_s must be <= retry_max_s")
        if self.key_store == "pkcs11" and self.key_type != "ecdsa-p256":
            raise ValueError('key_store = "pkcs11" needs key_type = "ecdsa-p256" (Debian 12\'s OpenSSL '
                             "pkcs11 engine cannot use Ed25519 keys for TLS)")
        if self.key_store == "pkcs11" and any(s.kind == "kubernetes" for s in self.sink):
            raise ValueError('a kubernetes sink needs key_store = "file": a key on a PKCS#11 token '
                             "cannot be copied into a Secret")
        if self.renew_jitter >= self.renew_fraction:
            raise ValueError("renew_jitter must be smaller than renew_fraction (renewal never "
                             "starts before the certificate does)")
        names = [s.name for s in self.sink]
        if len(set(names)) != len(names):
            raise ValueError("sink names must be unique")
        return self


class FlSettings(Section):
    """fl: federated learning client."""

    enabled: bool = setting(False, "Run the Flower SuperNode and take part in training rounds.")
    superlink: HostPort | None = setting(
        None, "Flower SuperLink address. Unset: no training.", allowed="HOST:PORT"
    )
    state_dir: AbsolutePath = setting(
        "/var/lib/tensorguard/fl", "Local training state and datasets.", allowed="an absolute path"
    )


class ServerSettings(Section):
    """tensorguard-server: the control plane."""

    host: str = setting("127.0.0.1", "Address the control plane's HTTPS API listens on.",
                        min_length=1, max_length=253)
    port: int = setting(8000, "TCP port of the control plane's API.", ge=1, le=65535)
    database_url: str = setting(
        "sqlite:////var/lib/tensorguard/server/server.db",
        "Storage: sqlite:///PATH or postgresql://...",
        pattern=r"^(sqlite:///|postgresql://)",
        allowed="sqlite:///PATH or postgresql://URL",
    )


class AgentConfig(Section):
    """The whole of agent.toml after drop-ins are merged."""

    agent: AgentSettings = AgentSettings()
    network: NetworkSettings = NetworkSettings()
    identity: IdentitySettings = IdentitySettings()
    fl: FlSettings = FlSettings()
    server: ServerSettings = ServerSettings()
