"""The tc/eBPF datapath: load ``netguard.bpf.o`` with libbpf, pin its maps, attach its programs to a
clsact qdisc with pyroute2, feed it selectors and mode, read its wire-view statistics, and remove
everything again.

Life cycle (one `TcDatapath` per uplink interface)::

    dp = TcDatapath("eth0", netns=None, pin_dir="/sys/fs/bpf/tensorguard/eth0",
                    object_path="/usr/lib/tensorguard/bpf/netguard.bpf.o")
    dp.load()                # checks interface, ABI and map layouts, loads, pins, writes config
    dp.set_selectors([...])  # before attach: nothing is protected yet, so nothing is dropped
    dp.attach()              # clsact qdisc (only if absent) + one bpf filter per direction
    dp.set_mode(Mode.FAIL_CLOSED)
    dp.stats()
    dp.detach()              # removes exactly what attach/load added

Selectors scoped to a systemd unit carry the unit's cgroup v2 id and level (`cgroup_ref(path)`):
on egress the program then also requires the sending socket to be in that cgroup (mirroring the
``xt_cgroup --path`` match of the pace-mode rules), so a fail-closed guard never drops another
sender's traffic to the same destination.

Crash recovery: `cleanup_stale(pin_dir, ifnames)` removes filters named ``tensorguard:*`` (and the
clsact qdisc when nothing else is left on it) and our pinned maps, left by a run that was killed.

Ownership: if a clsact qdisc already existed (another tool's filters), only our filters are added
and removed; otherwise the qdisc is ours and removing it removes our filters with it.

Network namespaces: ``netns`` names one under /run/netns (``ip netns``); the netlink socket is
opened inside it (setns on the calling thread only, restored before returning), so program fds
passed in netlink messages stay valid (they are fds of this process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from tensorguard.netguard.kernel import bpf_maps as m
from tensorguard.netguard.kernel import libbpf

FILTER_PREFIX = "tensorguard:"
FILTER_PRIO = 0x4754
"""tc filter priority of our filters (also how `detach` finds them on a shared clsact)."""
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003
TC_H_CLSACT_INGRESS = 0xFFFFFFF2
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
CLSACT_HANDLE = 0xFFFF0000
NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

# Link types (ARPHRD_*) and the bytes before the IP header that the program must skip.
_L2_BY_ARPHRD = {
    1: m.L2_ETHERNET,      # ARPHRD_ETHER: ethernet, veth, bridge, macvlan, ...
    772: m.L2_ETHERNET,    # ARPHRD_LOOPBACK (tc sees a zeroed ethernet header)
    65534: m.L2_NONE,      # ARPHRD_NONE: tun, wireguard
    512: m.L2_NONE,        # ARPHRD_PPP
    768: m.L2_NONE,        # ARPHRD_TUNNEL (ipip)
    769: m.L2_NONE,        # ARPHRD_TUNNEL6
    776: m.L2_NONE,        # ARPHRD_SIT
}

_DIRECTIONS = ((m.PROG_EGRESS, TC_H_CLSACT_EGRESS), (m.PROG_INGRESS, TC_H_CLSACT_INGRESS))


class DatapathError(RuntimeError):
    """The datapath cannot be set up as asked; nothing in the kernel was changed by the failing step."""


class AbiMismatch(DatapathError):
    """The BPF object was built for a different loader (TG_ABI_VERSION or map layout differs)."""


# --- network namespaces ----------------------------------------------------------------------

_setns_lock = threading.Lock()
_libc: list[ctypes.CDLL] = []


def _setns(fd: int) -> None:
    with _setns_lock:
        if not _libc:
            _libc.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
    if _libc[0].setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    if "/" in netns:
        return netns
    return os.path.join(NETNS_RUN_DIR, netns)


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread in ``netns`` (None: stay). Never creates one."""
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DatapathError(f"network namespace {netns!r} does not exist ({path})") from None
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
    finally:
        os.close(target)


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    """An rtnetlink socket bound to ``netns`` (it stays there after the thread switches back)."""
    with in_netns(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@dataclass(frozen=True)
class Link:
    ifindex: int
    arphrd: int
    l2_hlen: int


def lookup_link(ipr: Any, ifname: str, netns: str | None) -> Link:
    where = f" in network namespace {netns!r}" if netns else ""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise DatapathError(f"unknown interface {ifname!r}{where}")
    idx = int(found[0])
    arphrd = int(ipr.get_links(idx)[0]["ifi_type"])
    if arphrd not in _L2_BY_ARPHRD:
        raise DatapathError(f"interface {ifname!r}{where} has link type {arphrd} (ARPHRD), which the "
                            "datapath cannot parse (supported: ethernet, loopback, tun/wireguard, "
                            "ppp, ip tunnels)")
    return Link(idx, arphrd, _L2_BY_ARPHRD[arphrd])


def _our_filters(ipr: Any, ifindex: int) -> list[tuple[int, int, str]]:
    """(parent, prio, name) of the tensorguard filters on the clsact hooks of an interface."""
    out: list[tuple[int, int, str]] = []
    for parent in (TC_H_CLSACT_INGRESS, TC_H_CLSACT_EGRESS):
        try:
            filters = ipr.get_filters(index=ifindex, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT):  # no clsact qdisc
                continue
            raise
        for flt in filters:
            opts = flt.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if flt.get_attr("TCA_KIND") == "bpf" and name and str(name).startswith(FILTER_PREFIX):
                out.append((parent, int(flt["info"]) >> 16, str(name)))
    return out


def _filter_count(ipr: Any, ifindex: int) -> int:
    count = 0
    for parent in (TC_H_CLSACT_INGRESS, TC_H_CLSACT_EGRESS):
        with suppress(NetlinkError):
            count += sum(1 for f in ipr.get_filters(index=ifindex, parent=parent) if f["handle"])
    return count


def _has_clsact(ipr: Any, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(ifindex))


def _del_filter(ipr: Any, ifindex: int, parent: int, prio: int) -> None:
    try:
        ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE, parent=parent, prio=prio,
               protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise


CGROUP2_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def cgroup_ref(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(cgroup id, level) of a cgroup v2 directory, for `Selector.cgroup_id/cgroup_level`.

    The id of a cgroup v2 is its directory's inode number; the level is its depth below the
    cgroup2 mount root. A unit's cgroup exists only while it runs: resolve it after the unit
    started and again after it restarts (its cgroup is then a new one), like the iptables rules.
    """
    p = Path(path).resolve()
    root = next((Path(r) for r in CGROUP2_MOUNTS
                 if is_cgroup2(Path(r)) and (p == Path(r) or Path(r) in p.parents)), None)
    if root is None:
        raise DatapathError(f"{path} is not inside a cgroup v2 hierarchy ({', '.join(CGROUP2_MOUNTS)})")
    if not p.is_dir():
        raise DatapathError(f"cgroup {path} does not exist (is the unit running?)")
    level = len(p.relative_to(root).parts)
    if level == 0:
        raise DatapathError("the root cgroup matches every sender: leave the selector's unit unset")
    return p.stat().st_ino, level


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (unified, or hybrid's ``unified``), if anywhere."""
    return next((Path(r) for r in CGROUP2_MOUNTS if is_cgroup2(Path(r))), None)


def is_cgroup2(path: Path) -> bool:
    try:
        with open("/proc/mounts") as mounts:
            return any(f.split()[1] == str(path) and f.split()[2] == "cgroup2" for f in mounts)
    except OSError:
        return False


# --- the datapath ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatapathStats:
    selectors: tuple[m.SelectorStats, ...]
    flows: tuple[m.FlowStats, ...]
    counters: dict[tuple[m.Direction, m.GlobalCounter], int] = field(default_factory=dict)

    def selector(self, selector_id: int, direction: m.Direction) -> m.SelectorStats | None:
        for s in self.selectors:
            if s.selector_id == selector_id and s.direction == direction:
                return s
        return None

    def counter(self, direction: m.Direction, counter: m.GlobalCounter) -> int:
        return self.counters.get((direction, counter), 0)


def read_abi_version(obj: libbpf.BpfObject) -> int:
    if not obj.has_map(m.ABI_SECTION):
        raise AbiMismatch(f"{obj.path} has no {m.ABI_SECTION} section: not a netguard object, or "
                          "one older than the ABI check")
    raw = obj.initial_value(m.ABI_SECTION)
    if len(raw) != 4:
        raise AbiMismatch(f"{obj.path}: {m.ABI_SECTION} is {len(raw)} bytes, expected 4")
    return int.from_bytes(raw, sys.byteorder)


def check_object(obj: libbpf.BpfObject, expected_abi: int = m.ABI_VERSION) -> None:
    """Refuse an object built for another loader: ABI version, then every map's sizes."""
    version = read_abi_version(obj)
    if version != expected_abi:
        raise AbiMismatch(f"{obj.path} has netguard ABI version {version}, this agent expects "
                          f"{expected_abi}: install the BPF object from the same package build")
    for name, layout in m.MAP_LAYOUTS.items():
        if not obj.has_map(name):
            raise AbiMismatch(f"{obj.path} lacks map {name!r} (ABI {version})")
        sizes = obj.map_sizes(name)
        if sizes != (layout.key_size, layout.value_size):
            raise AbiMismatch(f"{obj.path}: map {name!r} has key/value sizes {sizes}, the loader's "
                              f"layout has {(layout.key_size, layout.value_size)}")


class TcDatapath:
    """The netguard tc/eBPF datapath of one interface. Not thread-safe: one owner calls it."""

    def __init__(self, ifname: str, netns: str | None, pin_dir: str | os.PathLike[str],
                 object_path: str | os.PathLike[str], *, config: m.Config | None = None,
                 expected_abi: int = m.ABI_VERSION) -> None:
        if not ifname or len(ifname) > 15 or "/" in ifname:
            raise DatapathError(f"invalid interface name {ifname!r}")
        self.ifname = ifname
        self.netns = netns
        self.pin_dir = Path(pin_dir)
        self.object_path = str(object_path)
        self.config = config or m.Config()
        self.expected_abi = expected_abi
        self._obj: libbpf.BpfObject | None = None
        self._link: Link | None = None
        self._pinned: list[str] = []
        self._created_pin_dir = False
        self._attached: list[tuple[int, int]] = []  # (parent, prio) of our filters
        self._created_clsact = False
        self._selectors: dict[bytes, bytes] = {}
        self._selector_ids: set[int] = set()
        self._ncpus = 0

    # -- load ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._obj is not None and self._obj.loaded

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def load(self) -> None:
        """Check interface, object and pin directory, then load, pin and configure.

        Every check happens before the first kernel change; a failure after it undoes what was
        done.
        """
        if self._obj is not None:
            raise DatapathError("already loaded")
        with _ipr(self.netns) as ipr:
            link = lookup_link(ipr, self.ifname, self.netns)
        if not os.path.isfile(self.object_path):
            raise DatapathError(f"BPF object {self.object_path} not found (build it with make -C bpf)")
        stale = [n for n in m.MAP_LAYOUTS if (self.pin_dir / n).exists()]
        if stale:
            raise DatapathError(f"{self.pin_dir} still holds pinned maps {', '.join(stale)} from an "
                                "earlier run: call cleanup_stale() first")
        cfg = m.Config(self.config.mode, self.config.shaper_mark, self.config.shaper_mask,
                       link.l2_hlen)
        obj = libbpf.BpfObject(self.object_path)
        try:
            check_object(obj, self.expected_abi)
            obj.load()
            self._obj = obj
            self._link = link
            self.config = cfg
            self._ncpus = libbpf.num_possible_cpus()
            libbpf.map_update(obj.map_fd(m.MAP_CONFIG), bytes(4), m.encode_config(cfg))
            self._pin_all()
        except BaseException:
            self._unpin_all()
            obj.close()
            self._obj = None
            self._link = None
            raise

    def _pin_all(self) -> None:
        assert self._obj is not None
        if not self.pin_dir.exists():
            self.pin_dir.mkdir(parents=True, mode=0o700)
            self._created_pin_dir = True
        for name in m.MAP_LAYOUTS:
            self._obj.pin_map(name, str(self.pin_dir / name))
            self._pinned.append(name)

    def _unpin_all(self) -> None:
        for name in self._pinned:
            with suppress(FileNotFoundError):
                os.unlink(self.pin_dir / name)
        self._pinned.clear()
        if self._created_pin_dir:
            with suppress(OSError):
                self.pin_dir.rmdir()
            self._created_pin_dir = False

    def _fd(self, name: str) -> int:
        if self._obj is None or not self._obj.loaded:
            raise DatapathError("datapath not loaded")
        return self._obj.map_fd(name)

    # -- attach / detach ----------------------------------------------------------------------

    def attach(self) -> None:
        """Add the clsact qdisc (unless present) and our ingress and egress filters."""
        if self._obj is None or self._link is None:
            raise DatapathError("load() before attach()")
        if self._attached:
            raise DatapathError("already attached")
        with _ipr(self.netns) as ipr:
            link = lookup_link(ipr, self.ifname, self.netns)
            if link.ifindex != self._link.ifindex:
                raise DatapathError(f"interface {self.ifname!r} was recreated since load()")
            if _our_filters(ipr, link.ifindex):
                raise DatapathError(f"{self.ifname} already carries tensorguard filters: call "
                                    "cleanup_stale() first")
            try:
                if not _has_clsact(ipr, link.ifindex):
                    ipr.tc("add", "clsact", link.ifindex)
                    self._created_clsact = True
                for prog, parent in _DIRECTIONS:
                    ipr.tc("add-filter", "bpf", link.ifindex, FILTER_HANDLE,
                           fd=self._obj.program_fd(prog), name=FILTER_PREFIX + prog, parent=parent,
                           prio=FILTER_PRIO, protocol=ETH_P_ALL, direct_action=True)
                    self._attached.append((parent, FILTER_PRIO))
            except BaseException:
                self._remove_tc(ipr, link.ifindex)
                raise

    def _remove_tc(self, ipr: Any, ifindex: int) -> None:
        if self._created_clsact:
            try:
                ipr.tc("del", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise
        else:
            for parent, prio in self._attached:
                _del_filter(ipr, ifindex, parent, prio)
        self._attached.clear()
        self._created_clsact = False

    def detach(self) -> None:
        """Remove our filters (or our clsact qdisc), unpin the maps, free the object. Idempotent."""
        try:
            if self.netns is not None and not os.path.exists(netns_path(self.netns)):
                # The namespace is gone, and its interfaces, qdiscs and filters with it.
                self._attached.clear()
                self._created_clsact = False
            if self._attached or self._created_clsact:
                with _ipr(self.netns) as ipr:
                    found = ipr.link_lookup(ifname=self.ifname)
                    if found and self._link is not None and int(found[0]) == self._link.ifindex:
                        self._remove_tc(ipr, self._link.ifindex)
                    else:  # the interface went away, and its qdiscs with it
                        self._attached.clear()
                        self._created_clsact = False
        finally:
            self._unpin_all()
            if self._obj is not None:
                self._obj.close()
                self._obj = None
            self._selectors.clear()
            self._selector_ids.clear()

    def __enter__(self) -> TcDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- policy -------------------------------------------------------------------------------

    def set_mode(self, mode: m.Mode, shaper_mark: int | None = None,
                 shaper_mask: int | None = None) -> None:
        """Switch observe / fail-open / fail-closed (and optionally the shaper mark) atomically."""
        cfg = m.Config(mode, self.config.shaper_mark if shaper_mark is None else shaper_mark,
                       self.config.shaper_mask if shaper_mask is None else shaper_mask,
                       self.config.l2_hlen)
        libbpf.map_update(self._fd(m.MAP_CONFIG), bytes(4), m.encode_config(cfg))
        self.config = cfg

    def set_selectors(self, selectors: Iterable[m.Selector]) -> None:
        """Replace the protected-flow selectors.

        Validated completely first (nothing changes on a ValueError). Then, in this order:
        statistics entries for new selectors, new/changed trie entries (each replaced in one
        update), stale trie entries deleted, stale statistics deleted. At every moment a packet
        is classified by either the old or the new entry of its prefix.
        """
        sels = list(selectors)
        entries = m.compile_selectors(sels)
        ids = {s.id for s in sels}
        trie, stats = self._fd(m.MAP_SELECTORS), self._fd(m.MAP_SEL_STATS)
        for sid in sorted(ids - self._selector_ids):
            for direction in m.Direction:
                try:
                    libbpf.map_update(stats, m.sel_key(sid, direction), m.ZERO_SEL_STATS,
                                      libbpf.BPF_NOEXIST)
                except libbpf.LibbpfError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
        for key, value in entries.items():
            if self._selectors.get(key) != value:
                libbpf.map_update(trie, key, value)
        for key in set(self._selectors) - set(entries):
            libbpf.map_delete(trie, key)
        for sid in sorted(self._selector_ids - ids):
            for direction in m.Direction:
                libbpf.map_delete(stats, m.sel_key(sid, direction))
        self._selectors = entries
        self._selector_ids = ids

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> DatapathStats:
        return read_stats(self._fd(m.MAP_SEL_STATS), self._fd(m.MAP_FLOWS), self._fd(m.MAP_GLOBAL),
                          self._ncpus)


def read_stats(sel_fd: int, flows_fd: int, global_fd: int, ncpus: int) -> DatapathStats:
    """Read counters and histograms from map fds (also usable on maps opened from their pins)."""
    lay = m.MAP_LAYOUTS
    sels: list[m.SelectorStats] = []
    for key in libbpf.map_keys(sel_fd, lay[m.MAP_SEL_STATS].key_size):
        val = libbpf.map_lookup(sel_fd, key, lay[m.MAP_SEL_STATS].value_size)
        if val is not None:
            sels.append(m.decode_sel_stats(key, val))
    flows: list[m.FlowStats] = []
    for key in libbpf.map_keys(flows_fd, lay[m.MAP_FLOWS].key_size):
        val = libbpf.map_lookup(flows_fd, key, lay[m.MAP_FLOWS].value_size)
        if val is not None:
            flows.append(m.decode_flow(key, val))
    counters: dict[tuple[m.Direction, m.GlobalCounter], int] = {}
    for direction in m.Direction:
        for counter in m.GlobalCounter:
            idx = m.global_key(direction, counter).to_bytes(4, sys.byteorder)
            raw = libbpf.map_lookup(global_fd, idx, 8 * ncpus)
            counters[(direction, counter)] = m.decode_percpu_u64(raw, ncpus) if raw else 0
    sels.sort(key=lambda s: (s.selector_id, s.direction))
    flows.sort(key=lambda f: (f.selector_id, f.direction, f.remote.packed, f.remote_port,
                              f.local_port))
    return DatapathStats(tuple(sels), tuple(flows), counters)


def read_pinned_stats(pin_dir: str | os.PathLike[str]) -> DatapathStats:
    """Statistics from the pinned maps of a running datapath (another process may own it)."""
    base = Path(pin_dir)
    fds: list[int] = []
    try:
        for name in (m.MAP_SEL_STATS, m.MAP_FLOWS, m.MAP_GLOBAL):
            fds.append(libbpf.obj_get(str(base / name)))
        return read_stats(fds[0], fds[1], fds[2], libbpf.num_possible_cpus())
    finally:
        for fd in fds:
            os.close(fd)


# --- crash recovery --------------------------------------------------------------------------


@dataclass
class CleanupReport:
    filters: list[str] = field(default_factory=list)
    qdiscs: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.filters or self.qdiscs or self.pins)


def cleanup_stale(pin_dir: str | os.PathLike[str], ifnames: Iterable[str],
                  netns: str | None = None) -> CleanupReport:
    """Remove what a crashed run left: our tc filters (and a clsact qdisc left empty by that) on
    the given interfaces, and our pinned maps in ``pin_dir`` (the directory too, when empty).

    Interfaces that do not exist are skipped (nothing can be attached to them).
    """
    report = CleanupReport()
    names = list(ifnames)
    if names:
        with _ipr(netns) as ipr:
            for ifname in names:
                found = ipr.link_lookup(ifname=ifname)
                if not found:
                    continue
                idx = int(found[0])
                ours = _our_filters(ipr, idx)
                for parent, prio, name in ours:
                    _del_filter(ipr, idx, parent, prio)
                    report.filters.append(f"{ifname}:{name}")
                if ours and _has_clsact(ipr, idx) and _filter_count(ipr, idx) == 0:
                    with suppress(NetlinkError):
                        ipr.tc("del", "clsact", idx)
                        report.qdiscs.append(f"{ifname}:clsact")
    base = Path(pin_dir)
    for name in m.MAP_LAYOUTS:
        path = base / name
        if path.exists():
            path.unlink()
            report.pins.append(str(path))
    if base.is_dir():
        with suppress(OSError):
            base.rmdir()
    return report
