"""Map layouts and encoders of the tc/eBPF datapath (pure: no root, no kernel)."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorguard.netguard.kernel import bpf_maps as m
from tensorguard.netguard.kernel import libbpf

REPO = Path(__file__).resolve().parents[3]
C_SOURCE = (REPO / "bpf" / "netguard.bpf.c").read_text()


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# --- layouts match the C ---------------------------------------------------------------------


def test_struct_sizes_match_the_documented_c_layout() -> None:
    assert ctypes.sizeof(m.TgConfig) == 16
    assert ctypes.sizeof(m.TgLpmKey) == 24
    assert ctypes.sizeof(m.TgRule) == 24
    assert ctypes.sizeof(m.TgLpmVal) == 24 * m.MAX_RULES
    assert ctypes.sizeof(m.TgSelKey) == 8
    assert ctypes.sizeof(m.TgSelStats) == 5 * 8 + 8 * (m.SIZE_BINS + m.IAT_BINS)
    assert ctypes.sizeof(m.TgFlowKey) == 40
    assert ctypes.sizeof(m.TgFlowVal) == 40


@pytest.mark.parametrize(("c_name", "py_value"), [
    ("TG_ABI_VERSION", m.ABI_VERSION),
    ("TG_MAX_RULES", m.MAX_RULES),
    ("TG_SIZE_BINS", m.SIZE_BINS),
    ("TG_IAT_BINS", m.IAT_BINS),
    ("TG_MAX_SELECTOR_ENTRIES", m.MAX_SELECTOR_ENTRIES),
    ("TG_MAX_FLOWS", m.MAX_FLOWS),
    ("TG_MODE_FAIL_OPEN", m.Mode.FAIL_OPEN),
    ("TG_MODE_FAIL_CLOSED", m.Mode.FAIL_CLOSED),
    ("TG_G_MAX", m.G_MAX),
])
def test_constants_match_the_c_source(c_name: str, py_value: int) -> None:
    found = re.search(rf"(?:#define\s+{c_name}\s+|{c_name}\s*=\s*)(\d+)", C_SOURCE)
    assert found, c_name
    assert int(found.group(1)) == py_value


def test_global_counter_order_matches_the_c_enum() -> None:
    enum_body = C_SOURCE[C_SOURCE.index("TG_G_PACKETS = 0"):C_SOURCE.index("TG_G_MAX = 16")]
    names = re.findall(r"TG_G_([A-Z0-9_]+)", enum_body)
    assert names == [c.name for c in m.GlobalCounter]


def test_map_and_program_names_exist_in_the_c_source() -> None:
    for name in (*m.MAP_LAYOUTS, m.PROG_EGRESS, m.PROG_INGRESS):
        assert re.search(rf"\b{name}\b", C_SOURCE), name
    assert m.ABI_SECTION in C_SOURCE


# --- LPM keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["10.0.0.0/8", "192.0.2.7/32", "0.0.0.0/0", "fd00:203::/64",
                                  "::/0", "2001:db8::1/128"])
def test_lpm_key_round_trip(text: str) -> None:
    key = m.lpm_key(net(text))
    assert len(key) == 24
    assert m.decode_lpm_key(key) == net(text)


def test_lpm_key_bytes() -> None:
    key = m.TgLpmKey.from_buffer_copy(m.lpm_key(net("10.1.0.0/16")))
    assert key.prefixlen == 8 + 16 and key.family == 4
    assert bytes(key.addr) == bytes([10, 1]) + bytes(14)
    key6 = m.TgLpmKey.from_buffer_copy(m.lpm_key(net("fd00::/8")))
    assert key6.prefixlen == 16 and key6.family == 6 and bytes(key6.addr)[0] == 0xFD


def test_lpm_key_family_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="is IPv4, key family is IPv6"):
        m.lpm_key(net("10.0.0.0/8"), family=6)
    with pytest.raises(ValueError, match="is IPv6, key family is IPv4"):
        m.lpm_key(net("fd00::/8"), family=4)


def test_decode_lpm_key_rejects_inconsistent_bytes() -> None:
    bad = m.TgLpmKey()
    bad.family, bad.prefixlen = 4, 8 + 33
    with pytest.raises(ValueError, match="does not fit IPv4"):
        m.decode_lpm_key(bytes(bad))
    bad.prefixlen, bad.addr[5] = 8 + 8, 1
    with pytest.raises(ValueError, match="beyond the first 4"):
        m.decode_lpm_key(bytes(bad))
    bad.family = 5
    with pytest.raises(ValueError, match="family 5"):
        m.decode_lpm_key(bytes(bad))
    with pytest.raises(ValueError, match="expected 24"):
        m.decode_lpm_key(b"\x00" * 20)


# --- selectors -------------------------------------------------------------------------------


def test_selector_parse_and_value_round_trip() -> None:
    sel = m.Selector.parse(7, "10.20.0.0/16", "udp", "5000-5100")
    assert (sel.port_lo, sel.port_hi) == (5000, 5100)
    assert m.Selector.parse(8, "10.0.0.0/8", "tcp", 443).port_lo == 443
    assert m.Selector.parse(9, "fd00::/8", "tcp", "22").port_hi == 22
    value = m.lpm_value([sel])
    assert len(value) == ctypes.sizeof(m.TgLpmVal)
    assert m.decode_lpm_value(value) == (m.Rule(7, "udp", 5000, 5100),)


@pytest.mark.parametrize(("args", "message"), [
    ((1, "10.0.0.1/8", "udp"), "invalid prefix '10.0.0.1/8'"),        # host bits set
    ((1, "10.0.0.0/33", "udp"), "invalid prefix"),
    ((1, "fd00::/129", "udp"), "invalid prefix"),
    ((1, "not-a-prefix", "udp"), "invalid prefix"),
    ((1, "10.0.0.0/8", "udp", "6000-5000"), r"port range 6000-5000 is empty \(low > high\)"),
    ((1, "10.0.0.0/8", "udp", "70000"), "port_lo 70000 must be in 0..65535"),
    ((1, "10.0.0.0/8", "udp", "a-b"), "must be N or LO-HI"),
    ((1, "10.0.0.0/8", "icmp"), "protocol 'icmp' must be one of any, tcp, udp"),
    ((1, "10.0.0.0/8", "any", "53"), "port range needs protocol tcp or udp"),
    ((0, "10.0.0.0/8", "udp"), "selector id 0 must be an integer in 1.."),
])
def test_invalid_selectors_are_refused(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        m.Selector.parse(*args)  # type: ignore[arg-type]


def test_selector_family_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="is IPv4, expected IPv6"):
        m.Selector.parse(1, "10.0.0.0/8", "udp", family=6)
    with pytest.raises(ValueError, match="is IPv6, expected IPv4"):
        m.Selector.parse(1, "fd00::/8", "udp", family=4)


def test_selector_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="is not an ip_network"):
        m.Selector(1, "10.0.0.0/8", "udp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        m.Selector(1, net("10.0.0.0/8"), "udp", 10, 9)


def test_compile_copies_covering_rules_most_specific_first() -> None:
    wide = m.Selector(1, net("10.0.0.0/8"), "udp", 5000, 5999)
    narrow = m.Selector(2, net("10.1.0.0/16"), "tcp", 443, 443)
    host = m.Selector(3, net("10.1.2.3/32"), "any")
    v6 = m.Selector(4, net("fd00::/8"), "udp")
    entries = m.compile_selectors([wide, narrow, host, v6])
    decoded = {m.decode_lpm_key(k): m.decode_lpm_value(v) for k, v in entries.items()}
    assert [r.id for r in decoded[net("10.0.0.0/8")]] == [1]
    assert [r.id for r in decoded[net("10.1.0.0/16")]] == [2, 1]
    assert [r.id for r in decoded[net("10.1.2.3/32")]] == [3, 2, 1]
    assert [r.id for r in decoded[net("fd00::/8")]] == [4]  # families never mix


def test_compile_refuses_duplicate_ids_and_too_many_overlaps() -> None:
    a = m.Selector(1, net("10.0.0.0/8"), "udp")
    b = m.Selector(1, net("10.1.0.0/16"), "udp")
    with pytest.raises(ValueError, match="selector id 1 is used twice"):
        m.compile_selectors([a, b])
    assert m.compile_selectors([a, a]) == m.compile_selectors([a])
    many = [m.Selector(i + 1, net(f"10.0.0.0/{8 + i}"), "udp") for i in range(m.MAX_RULES + 1)]
    with pytest.raises(ValueError, match=f"covered by {m.MAX_RULES + 1} selectors"):
        m.compile_selectors(many)


def test_reference_match_model() -> None:
    sels = [m.Selector(1, net("10.0.0.0/8"), "udp", 5000, 5999),
            m.Selector(2, net("10.1.0.0/16"), "tcp", 443, 443)]
    ip = ipaddress.ip_address
    assert m.match(sels, ip("10.1.2.3"), 17, 5001) == 1   # inherited from the /8
    assert m.match(sels, ip("10.1.2.3"), 6, 443) == 2
    assert m.match(sels, ip("10.1.2.3"), 6, 80) == 0
    assert m.match(sels, ip("10.9.9.9"), 17, 6000) == 0
    assert m.match(sels, ip("10.9.9.9"), 17, None) == 1   # fragment: ports unknown
    assert m.match(sels, ip("192.0.2.1"), 17, 5001) == 0


def test_cgroup_scoped_selectors() -> None:
    scoped = m.Selector.parse(2, "10.0.0.0/8", "udp", "5000", cgroup=(4242, 3))
    plain = m.Selector(1, net("10.0.0.0/8"), "udp", 5000, 5000)
    [(_, value)] = m.compile_selectors([plain, scoped]).items()
    rules = m.decode_lpm_value(value)
    assert rules == (m.Rule(2, "udp", 5000, 5000, 4242, 3), m.Rule(1, "udp", 5000, 5000))
    ip = ipaddress.ip_address("10.1.1.1")
    inside = [1, 100, 200, 4242, 5000]  # root .. the socket's cgroup (4242 at level 3)
    assert m.match([plain, scoped], ip, 17, 5000, cgroups=inside) == 2
    assert m.match([plain, scoped], ip, 17, 5000, cgroups=[1, 100, 201]) == 1
    assert m.match([scoped], ip, 17, 5000, cgroups=[1, 100, 201]) == 0
    assert m.match([scoped], ip, 17, 5000, egress=False) == 2  # ingress: address only
    with pytest.raises(ValueError, match=r"cgroup level 0 must be in 1\.\.255"):
        m.Selector(3, net("10.0.0.0/8"), "udp", cgroup_id=5)
    with pytest.raises(ValueError, match="cgroup level without a cgroup id"):
        m.Selector(3, net("10.0.0.0/8"), "udp", cgroup_level=2)
    with pytest.raises(ValueError, match="must be a u64"):
        m.Selector(3, net("10.0.0.0/8"), "udp", cgroup_id=-1, cgroup_level=1)


@given(st.integers(min_value=0, max_value=32), st.integers(min_value=0, max_value=2**32 - 1),
       st.sampled_from(["any", "tcp", "udp"]), st.integers(0, 65535), st.integers(0, 65535),
       st.integers(1, 2**32 - 1))
def test_selector_entry_round_trip_property(plen: int, addr: int, proto: str, a: int, b: int,
                                            sid: int) -> None:
    network = ipaddress.IPv4Network((addr, plen), strict=False)
    lo, hi = (0, 65535) if proto == "any" else (min(a, b), max(a, b))
    sel = m.Selector(sid, network, proto, lo, hi)
    [(key, value)] = m.compile_selectors([sel]).items()
    assert m.decode_lpm_key(key) == network
    assert m.decode_lpm_value(value) == (m.Rule(sid, proto, lo, hi),)


# --- config ----------------------------------------------------------------------------------


def test_config_round_trip_and_validation() -> None:
    cfg = m.Config(m.Mode.FAIL_CLOSED, 0x54470000, 0xFFFF0000, m.L2_NONE)
    assert m.decode_config(m.encode_config(cfg)) == cfg
    with pytest.raises(ValueError, match="inside mask"):
        m.Config(m.Mode.FAIL_OPEN, 0x3, 0x1)
    with pytest.raises(ValueError, match="shaper mask 0 must be"):
        m.Config(m.Mode.FAIL_OPEN, 0x1, 0)
    with pytest.raises(ValueError, match="l2_hlen"):
        m.Config(l2_hlen=4)
    with pytest.raises(ValueError, match="must be a Mode"):
        m.Config(mode=2)  # type: ignore[arg-type]
    raw = m.TgConfig(7, 1, 1, 14)
    with pytest.raises(ValueError, match="mode 7 is unknown"):
        m.decode_config(bytes(raw))


# --- stats -----------------------------------------------------------------------------------


def test_histogram_bins_mirror_the_c() -> None:
    assert [m.size_bin(n) for n in (0, 63, 64, 228, 1028, 1984, 9000)] == [0, 0, 1, 3, 16, 31, 31]
    assert [m.iat_bin(ns) for ns in (0, 999, 1000, 1999, 2000, 3999, 4000)] == [0, 0, 1, 1, 2, 2, 3]
    assert m.iat_bin(10**18) == m.IAT_BINS - 1
    assert m.size_bin_range(3) == (192, 256) and m.size_bin_range(31) == (1984, None)
    assert m.iat_bin_range_us(0) == (0, 1) and m.iat_bin_range_us(3) == (4, 8)


@given(st.integers(min_value=0, max_value=2**40))
def test_iat_bin_lies_in_its_range(ns: int) -> None:
    i = m.iat_bin(ns)
    low, high = m.iat_bin_range_us(i)
    assert low <= ns // 1000 and (high is None or ns // 1000 < high)


def test_sel_stats_decode() -> None:
    raw = m.TgSelStats()
    raw.packets, raw.bytes, raw.unshaped, raw.dropped, raw.last_ns = 3, 900, 2, 1, 123
    raw.size_hist[4] = 3
    raw.iat_hist[10] = 2
    st_ = m.decode_sel_stats(m.sel_key(5, m.Direction.INGRESS), bytes(raw))
    assert (st_.selector_id, st_.direction, st_.packets, st_.bytes) == (5, m.Direction.INGRESS, 3, 900)
    assert (st_.unshaped, st_.dropped, st_.last_ns) == (2, 1, 123)
    assert st_.size_hist[4] == 3 and sum(st_.size_hist) == 3 and st_.iat_hist[10] == 2
    assert len(m.ZERO_SEL_STATS) == ctypes.sizeof(m.TgSelStats)
    with pytest.raises(ValueError, match="direction 9"):
        m.decode_sel_stats(bytes(m.TgSelKey(5, 9)), bytes(raw))
    with pytest.raises(ValueError, match="expected 552"):
        m.decode_sel_stats(m.sel_key(5, m.Direction.EGRESS), b"\x00" * 10)


@pytest.mark.parametrize(("local", "remote"), [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")])
def test_flow_key_round_trip(local: str, remote: str) -> None:
    lo, re_ = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    key = m.encode_flow_key(lo.version, 17, m.Direction.EGRESS, local=lo, local_port=40000,
                            remote=re_, remote_port=5000)
    val = m.TgFlowVal(10, 2000, 1, 2, 7, 0)
    flow = m.decode_flow(key, bytes(val))
    assert (flow.local, flow.local_port, flow.remote, flow.remote_port) == (lo, 40000, re_, 5000)
    assert (flow.packets, flow.bytes, flow.selector_id, flow.protocol) == (10, 2000, 7, 17)


def test_flow_key_family_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match family IPv6"):
        m.encode_flow_key(6, 17, m.Direction.EGRESS, local=ipaddress.ip_address("10.0.0.1"),
                          local_port=1, remote=ipaddress.ip_address("fd00::1"), remote_port=2)


def test_percpu_sum_and_global_keys() -> None:
    data = b"".join(n.to_bytes(8, sys.byteorder) for n in (1, 2, 3, 4))
    assert m.decode_percpu_u64(data, 4) == 10
    with pytest.raises(ValueError, match="short for 8 CPUs"):
        m.decode_percpu_u64(data, 8)
    assert m.global_key(m.Direction.INGRESS, m.GlobalCounter.DROPPED) == m.G_MAX + 8


# --- the built object (no root needed to open it; skipped when not built) --------------------

OBJECT = REPO / "bpf" / "build" / "netguard.bpf.o"


def _open_object() -> libbpf.BpfObject:
    if not OBJECT.exists():
        pytest.skip(f"{OBJECT} not built (make -C bpf)")
    try:
        return libbpf.BpfObject(str(OBJECT))
    except libbpf.LibbpfUnavailable as exc:
        pytest.skip(str(exc))


def test_built_object_has_our_abi_and_map_layouts() -> None:
    obj = _open_object()
    with obj:
        assert int.from_bytes(obj.initial_value(m.ABI_SECTION), sys.byteorder) == m.ABI_VERSION
        for name, layout in m.MAP_LAYOUTS.items():
            assert obj.map_sizes(name) == (layout.key_size, layout.value_size), name


def test_libbpf_open_error_carries_errno_and_log(tmp_path: Path) -> None:
    try:
        libbpf.lib()
    except libbpf.LibbpfUnavailable as exc:
        pytest.skip(str(exc))
    with pytest.raises(libbpf.LibbpfError, match=r"cannot open BPF object .*missing\.o") as info:
        libbpf.BpfObject(str(tmp_path / "missing.o"))
    assert info.value.errno == 2
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(libbpf.LibbpfError, match="libbpf log:") as info:
        libbpf.BpfObject(str(junk))
    assert info.value.log
