"""Layouts of the netguard eBPF maps and pure encoders/decoders for them (no kernel access).

The C side is ``bpf/netguard.bpf.c``; its header comment documents every map. The ctypes
structures below mirror its structs field for field, and the loader checks at run time that the
object's ABI version equals `ABI_VERSION` and that every map's key/value size equals the size of
the structure here, so a drift between the two sides is refused instead of misread.

Everything in this module is pure: it turns policy (networks, protocols, port ranges, ids) into
the bytes the kernel maps take, and map bytes back into dataclasses. Invalid input raises
`ValueError` with a message naming the offending value.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_S = TypeVar("_S", bound=ctypes.Structure)

ABI_VERSION = 1
"""Must equal TG_ABI_VERSION in bpf/netguard.bpf.c (read from the object's .rodata.tg_abi)."""
ABI_SECTION = ".rodata.tg_abi"

MAX_RULES = 8
SIZE_BINS = 32
SIZE_BIN_WIDTH = 64
IAT_BINS = 32
MAX_SELECTOR_ENTRIES = 4096
MAX_FLOWS = 16384
G_MAX = 16

PROG_EGRESS = "tg_egress"
PROG_INGRESS = "tg_ingress"

MAP_CONFIG = "tg_config"
MAP_SELECTORS = "tg_selectors"
MAP_SEL_STATS = "tg_sel_stats"
MAP_FLOWS = "tg_flows"
MAP_GLOBAL = "tg_global"

L2_ETHERNET = 14
L2_NONE = 0

PROTOCOLS = {"any": 0, "tcp": 6, "udp": 17}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


class Mode(enum.IntEnum):
    """tg_config.mode: what the egress program does with protected packets the shaper did not mark."""

    OBSERVE = 0
    """Telemetry only: no leak accounting, nothing dropped."""
    FAIL_OPEN = 1
    """Unmarked protected packets pass and are counted as unshaped."""
    FAIL_CLOSED = 2
    """Unmarked protected packets are dropped (TC_ACT_SHOT) and counted."""


class Direction(enum.IntEnum):
    EGRESS = 0
    INGRESS = 1


class GlobalCounter(enum.IntEnum):
    """Indices of the per-direction counters in tg_global (TG_G_* in the C)."""

    PACKETS = 0
    BYTES = 1
    IPV4 = 2
    IPV6 = 3
    OTHER = 4
    TRUNCATED = 5
    PROTECTED = 6
    UNSHAPED = 7
    DROPPED = 8
    NO_STATS = 9


# --- C layouts -------------------------------------------------------------------------------


class TgConfig(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("shaper_mark", ctypes.c_uint32),
        ("shaper_mask", ctypes.c_uint32),
        ("l2_hlen", ctypes.c_uint32),
    ]


class TgLpmKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
        ("pad", ctypes.c_uint8 * 3),
    ]


class TgRule(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("id", ctypes.c_uint32),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("cgroup_level", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 6),
    ]


class TgLpmVal(ctypes.Structure):
    _fields_ = [("rules", TgRule * MAX_RULES)]


class TgSelKey(ctypes.Structure):
    _fields_ = [("selector_id", ctypes.c_uint32), ("dir", ctypes.c_uint32)]


class TgSelStats(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("unshaped", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("size_hist", ctypes.c_uint64 * SIZE_BINS),
        ("iat_hist", ctypes.c_uint64 * IAT_BINS),
    ]


class TgFlowKey(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
    ]


class TgFlowVal(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("selector_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class MapLayout:
    key_size: int
    value_size: int
    """Per-CPU maps: the size of one CPU's value."""
    percpu: bool = False


MAP_LAYOUTS: Mapping[str, MapLayout] = {
    MAP_CONFIG: MapLayout(4, ctypes.sizeof(TgConfig)),
    MAP_SELECTORS: MapLayout(ctypes.sizeof(TgLpmKey), ctypes.sizeof(TgLpmVal)),
    MAP_SEL_STATS: MapLayout(ctypes.sizeof(TgSelKey), ctypes.sizeof(TgSelStats)),
    MAP_FLOWS: MapLayout(ctypes.sizeof(TgFlowKey), ctypes.sizeof(TgFlowVal)),
    MAP_GLOBAL: MapLayout(4, 8, percpu=True),
}
"""Every map the loader uses, with the sizes the C must have (checked before loading)."""


# --- selectors -------------------------------------------------------------------------------


def _check_u32(name: str, value: object, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value!r} must be an integer in {low}..{0xFFFFFFFF}")
    return value


@dataclass(frozen=True)
class Selector:
    """One protected-flow selector: remote prefix, protocol and remote port range."""

    id: int
    network: IPNetwork
    protocol: str = "any"
    port_lo: int = 0
    port_hi: int = 65535
    cgroup_id: int = 0
    """Non-zero: egress only from sockets in this cgroup v2 (a systemd unit's), or below it."""
    cgroup_level: int = 0
    """Depth of that cgroup below the root (root = 0); see `tc.cgroup_ref`."""

    def __post_init__(self) -> None:
        _check_u32("selector id", self.id, low=1)
        if not isinstance(self.network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ValueError(f"selector {self.id}: network {self.network!r} is not an ip_network")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"selector {self.id}: protocol {self.protocol!r} must be one of "
                             f"{', '.join(PROTOCOLS)}")
        for name, port in (("port_lo", self.port_lo), ("port_hi", self.port_hi)):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise ValueError(f"selector {self.id}: {name} {port!r} must be in 0..65535")
        if self.port_lo > self.port_hi:
            raise ValueError(f"selector {self.id}: port range {self.port_lo}-{self.port_hi} is "
                             "empty (low > high)")
        if self.protocol == "any" and (self.port_lo, self.port_hi) != (0, 65535):
            raise ValueError(f"selector {self.id}: a port range needs protocol tcp or udp")
        if not isinstance(self.cgroup_id, int) or not 0 <= self.cgroup_id < 1 << 64:
            raise ValueError(f"selector {self.id}: cgroup id {self.cgroup_id!r} must be a u64")
        if self.cgroup_id and not (isinstance(self.cgroup_level, int) and 1 <= self.cgroup_level <= 255):
            raise ValueError(f"selector {self.id}: cgroup level {self.cgroup_level!r} must be in 1..255")
        if not self.cgroup_id and self.cgroup_level:
            raise ValueError(f"selector {self.id}: cgroup level without a cgroup id")

    @classmethod
    def parse(cls, id: int, network: str | IPNetwork, protocol: str = "any",
              ports: str | int | tuple[int, int] | None = None, *, family: int | None = None,
              cgroup: tuple[int, int] | None = None) -> Selector:
        """Build from policy strings: ``network`` strict (no host bits), ``ports`` "N" or "LO-HI".

        ``family`` (4 or 6), when given, must agree with the network.
        """
        try:
            net = ipaddress.ip_network(network, strict=True) if isinstance(network, str) else network
        except ValueError as exc:
            raise ValueError(f"selector {id}: invalid prefix {network!r}: {exc}") from None
        if family is not None and family != net.version:
            raise ValueError(f"selector {id}: prefix {net} is IPv{net.version}, expected IPv{family}")
        lo, hi = 0, 65535
        if isinstance(ports, tuple):
            lo, hi = ports
        elif isinstance(ports, int) and not isinstance(ports, bool):
            lo = hi = ports
        elif isinstance(ports, str):
            text = ports.strip()
            try:
                if "-" in text:
                    a, b = text.split("-", 1)
                    lo, hi = int(a), int(b)
                else:
                    lo = hi = int(text)
            except ValueError:
                raise ValueError(f"selector {id}: ports {ports!r} must be N or LO-HI") from None
        elif ports is not None:
            raise ValueError(f"selector {id}: ports {ports!r} must be N or LO-HI")
        cg_id, cg_level = cgroup or (0, 0)
        return cls(id=id, network=net, protocol=protocol, port_lo=lo, port_hi=hi, cgroup_id=cg_id,
                   cgroup_level=cg_level)


def lpm_key(network: IPNetwork, family: int | None = None) -> bytes:
    """tg_selectors key of a network: prefixlen counts the family byte (8 + prefix length)."""
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise ValueError(f"{network!r} is not an ip_network")
    if family is not None and family != network.version:
        raise ValueError(f"prefix {network} is IPv{network.version}, key family is IPv{family}")
    key = TgLpmKey()
    key.prefixlen = 8 + network.prefixlen
    key.family = network.version
    packed = network.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return bytes(key)


def decode_lpm_key(data: bytes) -> IPNetwork:
    key = _from_bytes(TgLpmKey, data, "LPM key")
    family = key.family
    if family not in (4, 6):
        raise ValueError(f"LPM key family {family} must be 4 or 6")
    width = 32 if family == 4 else 128
    plen = key.prefixlen - 8
    if not 0 <= plen <= width:
        raise ValueError(f"LPM key prefix length {key.prefixlen} does not fit IPv{family}")
    raw = bytes(key.addr)
    if family == 4 and any(raw[4:]):
        raise ValueError("LPM key of family IPv4 has address bytes beyond the first 4")
    addr = raw[:4] if family == 4 else raw
    return ipaddress.ip_network((addr, plen), strict=True)


def lpm_value(rules: Sequence[Selector]) -> bytes:
    """tg_selectors value: up to MAX_RULES rules, in the order given (most specific first)."""
    if len(rules) > MAX_RULES:
        raise ValueError(f"{len(rules)} selectors overlap one prefix; at most {MAX_RULES} can")
    val = TgLpmVal()
    for i, sel in enumerate(rules):
        r = val.rules[i]
        r.id = sel.id
        r.proto = PROTOCOLS[sel.protocol]
        r.port_lo = sel.port_lo
        r.port_hi = sel.port_hi
        r.cgroup_id = sel.cgroup_id
        r.cgroup_level = sel.cgroup_level
    return bytes(val)


@dataclass(frozen=True)
class Rule:
    id: int
    protocol: str
    port_lo: int
    port_hi: int
    cgroup_id: int = 0
    cgroup_level: int = 0


def decode_lpm_value(data: bytes) -> tuple[Rule, ...]:
    val = _from_bytes(TgLpmVal, data, "LPM value")
    out: list[Rule] = []
    for r in val.rules:
        if r.id == 0:
            break
        if r.proto not in PROTOCOL_NAMES:
            raise ValueError(f"rule {r.id}: unknown protocol number {r.proto}")
        out.append(Rule(r.id, PROTOCOL_NAMES[r.proto], r.port_lo, r.port_hi, r.cgroup_id,
                        r.cgroup_level))
    return tuple(out)


def compile_selectors(selectors: Iterable[Selector]) -> dict[bytes, bytes]:
    """All tg_selectors entries for a policy: {key bytes: value bytes}.

    One entry per distinct network. Each entry lists the rules of every selector whose network
    contains it, longest prefix first, cgroup-scoped before unscoped, then in the order given, so
    the kernel's single longest-prefix lookup finds every selector that can match the address.
    """
    sels = list(selectors)
    seen: dict[int, Selector] = {}
    for sel in sels:
        if not isinstance(sel, Selector):
            raise ValueError(f"not a Selector: {sel!r}")
        if sel.id in seen and seen[sel.id] != sel:
            raise ValueError(f"selector id {sel.id} is used twice")
        seen[sel.id] = sel
    unique = list(seen.values())
    if len(unique) > MAX_SELECTOR_ENTRIES:
        raise ValueError(f"{len(unique)} selectors; at most {MAX_SELECTOR_ENTRIES} are supported")
    networks = sorted({s.network for s in unique}, key=lambda n: (n.version, n.prefixlen,
                                                                  n.network_address.packed))
    if len(networks) > MAX_SELECTOR_ENTRIES:
        raise ValueError(f"{len(networks)} prefixes; at most {MAX_SELECTOR_ENTRIES} are supported")
    out: dict[bytes, bytes] = {}
    for net in networks:
        covering = [s for s in unique
                    if s.network.version == net.version and net.subnet_of(s.network)]  # type: ignore[arg-type]
        covering.sort(key=lambda s: (-s.network.prefixlen, s.cgroup_id == 0))  # stable sort
        if len(covering) > MAX_RULES:
            raise ValueError(f"prefix {net} is covered by {len(covering)} selectors "
                             f"({', '.join(str(s.id) for s in covering)}); at most {MAX_RULES}")
        out[lpm_key(net)] = lpm_value(covering)
    return out


def match(selectors: Iterable[Selector], remote: IPAddress, protocol: int,
          remote_port: int | None, *, egress: bool = True, cgroups: Sequence[int] = ()) -> int:
    """Reference model of the kernel's classify(): the selector id a packet gets (0: none).

    ``remote_port`` None means ports unknown (not TCP/UDP, or a fragment). ``cgroups``: the
    cgroup ids from the root down to the sending socket's cgroup (egress).
    """
    entries = compile_selectors(selectors)
    best: tuple[int, bytes] | None = None
    for key in entries:
        net = decode_lpm_key(key)
        if net.version == remote.version and remote in net and (best is None or
                                                                net.prefixlen > best[0]):
            best = (net.prefixlen, key)
    if best is None:
        return 0
    for rule in decode_lpm_value(entries[best[1]]):
        if rule.protocol != "any" and PROTOCOLS[rule.protocol] != protocol:
            continue
        if remote_port is not None and not rule.port_lo <= remote_port <= rule.port_hi:
            continue
        if rule.cgroup_id and egress and (rule.cgroup_level >= len(cgroups)
                                          or cgroups[rule.cgroup_level] != rule.cgroup_id):
            continue
        return rule.id
    return 0


# --- config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    mode: Mode = Mode.OBSERVE
    shaper_mark: int = 0x10000
    shaper_mask: int = 0x10000
    l2_hlen: int = L2_ETHERNET

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            raise ValueError(f"mode {self.mode!r} must be a Mode")
        _check_u32("shaper mask", self.shaper_mask, low=1)
        _check_u32("shaper mark", self.shaper_mark, low=1)
        if self.shaper_mark & ~self.shaper_mask:
            raise ValueError(f"shaper mark {self.shaper_mark:#x} must lie inside mask "
                             f"{self.shaper_mask:#x}")
        if self.l2_hlen not in (L2_ETHERNET, L2_NONE):
            raise ValueError(f"l2_hlen {self.l2_hlen!r} must be {L2_ETHERNET} or {L2_NONE}")


def encode_config(cfg: Config) -> bytes:
    return bytes(TgConfig(int(cfg.mode), cfg.shaper_mark, cfg.shaper_mask, cfg.l2_hlen))


def decode_config(data: bytes) -> Config:
    raw = _from_bytes(TgConfig, data, "config")
    try:
        mode = Mode(raw.mode)
    except ValueError:
        raise ValueError(f"config mode {raw.mode} is unknown") from None
    return Config(mode, raw.shaper_mark, raw.shaper_mask, raw.l2_hlen)


# --- stats -----------------------------------------------------------------------------------


def sel_key(selector_id: int, direction: Direction) -> bytes:
    _check_u32("selector id", selector_id, low=1)
    return bytes(TgSelKey(selector_id, int(Direction(direction))))


ZERO_SEL_STATS = bytes(ctypes.sizeof(TgSelStats))


def size_bin(ip_len: int) -> int:
    """Bin of the size histogram for an IP packet length (mirror of size_bin() in the C)."""
    return min(ip_len // SIZE_BIN_WIDTH, SIZE_BINS - 1)


def iat_bin(delta_ns: int) -> int:
    """Bin of the inter-arrival histogram (mirror of iat_bin() in the C)."""
    us = delta_ns // 1000
    return 0 if us == 0 else min(us.bit_length(), IAT_BINS - 1)


def size_bin_range(i: int) -> tuple[int, int | None]:
    """[low, high) of size bin i in bytes; high None for the open last bin."""
    return i * SIZE_BIN_WIDTH, None if i == SIZE_BINS - 1 else (i + 1) * SIZE_BIN_WIDTH


def iat_bin_range_us(i: int) -> tuple[int, int | None]:
    """[low, high) of inter-arrival bin i in microseconds; high None for the open last bin."""
    low = 0 if i == 0 else 1 << (i - 1)
    return low, None if i == IAT_BINS - 1 else 1 << i


@dataclass(frozen=True)
class SelectorStats:
    """The wire view of one selector in one direction."""

    selector_id: int
    direction: Direction
    packets: int
    bytes: int
    unshaped: int
    dropped: int
    last_ns: int
    size_hist: tuple[int, ...]
    iat_hist: tuple[int, ...]


def decode_sel_stats(key: bytes, value: bytes) -> SelectorStats:
    k = _from_bytes(TgSelKey, key, "selector stats key")
    v = _from_bytes(TgSelStats, value, "selector stats value")
    try:
        direction = Direction(k.dir)
    except ValueError:
        raise ValueError(f"selector stats direction {k.dir} is unknown") from None
    return SelectorStats(k.selector_id, direction, v.packets, v.bytes, v.unshaped, v.dropped,
                         v.last_ns, tuple(v.size_hist), tuple(v.iat_hist))


@dataclass(frozen=True)
class FlowStats:
    """Counters of one protected flow in one direction (local/remote from the robot's side)."""

    family: int
    protocol: int
    direction: Direction
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    packets: int
    bytes: int
    first_ns: int
    last_ns: int
    selector_id: int


def _addr(family: int, raw: bytes) -> IPAddress:
    if family == 4:
        return ipaddress.IPv4Address(raw[:4])
    if family == 6:
        return ipaddress.IPv6Address(raw)
    raise ValueError(f"flow family {family} must be 4 or 6")


def decode_flow(key: bytes, value: bytes) -> FlowStats:
    k = _from_bytes(TgFlowKey, key, "flow key")
    v = _from_bytes(TgFlowVal, value, "flow value")
    try:
        direction = Direction(k.dir)
    except ValueError:
        raise ValueError(f"flow direction {k.dir} is unknown") from None
    return FlowStats(k.family, k.proto, direction, _addr(k.family, bytes(k.local_addr)), k.local_port,
                     _addr(k.family, bytes(k.remote_addr)), k.remote_port, v.packets, v.bytes,
                     v.first_ns, v.last_ns, v.selector_id)


def encode_flow_key(family: int, protocol: int, direction: Direction, *, local: IPAddress,
                    local_port: int, remote: IPAddress, remote_port: int) -> bytes:
    """Flow key bytes (used by tests and by `net.flows` lookups of one flow)."""
    if local.version != family or remote.version != family:
        raise ValueError(f"flow addresses {local}, {remote} do not match family IPv{family}")
    k = TgFlowKey()
    k.family, k.proto, k.dir = family, protocol, int(direction)
    k.local_port, k.remote_port = local_port, remote_port
    ctypes.memmove(k.local_addr, local.packed, len(local.packed))
    ctypes.memmove(k.remote_addr, remote.packed, len(remote.packed))
    return bytes(k)


def global_key(direction: Direction, counter: GlobalCounter) -> int:
    return int(direction) * G_MAX + int(counter)


def decode_percpu_u64(data: bytes, ncpus: int) -> int:
    """Sum of a per-CPU u64 value (libbpf returns one 8-byte slot per possible CPU)."""
    if len(data) < 8 * ncpus:
        raise ValueError(f"per-CPU value of {len(data)} bytes is short for {ncpus} CPUs")
    return sum(int.from_bytes(data[8 * i:8 * i + 8], sys.byteorder) for i in range(ncpus))


def _from_bytes(cls: type[_S], data: bytes, what: str) -> _S:
    if len(data) != ctypes.sizeof(cls):
        raise ValueError(f"{what} is {len(data)} bytes, expected {ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)
