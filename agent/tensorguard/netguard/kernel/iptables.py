"""NFQUEUE pace mode rules: the agent's own iptables-nft chains, rendered and applied atomically.

Two layers:

* **Pure**: `Selector` and `Ruleset` describe which locally generated packets are protected;
  `render()` turns them into deterministic ``iptables-restore --noflush`` text per address
  family. Invalid input raises `RulesetError` with a message naming the selector and field.
* **Adapter**: `apply()`, `remove()` and `list_ours()` run ``iptables-restore`` /
  ``ip6tables-restore`` / ``*-save`` (optionally inside a network namespace).

Layout (table ``mangle``)::

    OUTPUT               -j TENSORGUARD-OUTPUT              (inserted once, first rule)
    TENSORGUARD-OUTPUT   -o lo -j RETURN                    (loopback never reaches the wire)
                         -m mark --mark M/MASK -j RETURN    (already shaped: released or dummy)
                         <selector match> -j TENSORGUARD-PROTECT   (one rule per selector)
    TENSORGUARD-PROTECT  -j NFQUEUE --queue-num N [--queue-bypass]

Why ``mangle`` and not ``filter``: mangle OUTPUT (priority -150) sees every locally generated
packet before the filter table, so the queue sits in front of whatever firewall the host runs and
an early ``ACCEPT`` in someone else's filter OUTPUT chain cannot bypass the shaper (in nftables
every base chain is traversed independently, but in ``filter`` we would also have to be ordered
relative to ufw/firewalld/docker rules that rewrite that table wholesale). Firewall managers
own ``filter``; ``mangle`` is the conventional place for mark-based packet handling, so our jump
is far less likely to be flushed by a reload of another tool. Consequences, documented for
policy authors: selectors match the destination the application used, before an OUTPUT DNAT
(nat OUTPUT runs at -100, after us); a packet shaped here and then dropped by the filter table
has used a slot; and the pacer's mark is set on reinjection, which does not trigger a reroute,
so the shaper mark bits must not be used for policy routing.

Atomicity: each family is one ``iptables-restore --noflush`` transaction (one nftables batch):
our chains are declared, flushed and refilled, and the jump is inserted only when absent, so
re-applying swaps the rule set without a window where protected packets go unqueued or
unprotected. ``--test`` is run first to catch syntax errors; iptables-nft's ``--test`` does not
ask the kernel, so rules the kernel rejects (e.g. an ``xt_cgroup`` path that does not exist yet)
fail at commit time, where the batch is rejected as a whole and nothing changes either way.

Limits: ``xt_cgroup --path`` works on the cgroup v2 hierarchy and resolves the path when the rule
is loaded: the unit must be running, and the rule set must be re-applied after the unit restarts
(its cgroup is a new one); `Datapath.refresh_cgroups` does both. Non-first IPv4 fragments carry
no ports and do not match port selectors.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TABLE = "mangle"
CHAIN_OUTPUT = "TENSORGUARD-OUTPUT"
CHAIN_PROTECT = "TENSORGUARD-PROTECT"
CHAIN_PREFIX = "TENSORGUARD-"
OUR_CHAINS = (CHAIN_OUTPUT, CHAIN_PROTECT)
JUMP_RULE = f"-A OUTPUT -j {CHAIN_OUTPUT}"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# systemd unit names: ASCII letters, digits, ":-_.\" and one "@" for templates; max 255 chars.
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?")
_UNIT_SUFFIXES = (".service", ".scope", ".slice")
_DEFAULT_SLICE = "system.slice"


class RulesetError(ValueError):
    """A selector or rule set that cannot be rendered; the message says which and why."""


class IptablesError(RuntimeError):
    """iptables refused a transaction; the message carries its stderr. Nothing was changed."""


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    ANY = "any"


class FailMode(enum.Enum):
    """What happens to protected packets when no pacer is bound to the queue."""

    OPEN = "open"
    """``--queue-bypass``: they pass unshaped (availability over protection)."""
    CLOSED = "closed"
    """They are dropped (protection over availability)."""


def _cgroup_path(selector: str, unit: str) -> str:
    """``ros2-control.service`` → ``system.slice/ros2-control.service``; slice paths kept as given."""
    parts = unit.split("/")
    if "/" not in unit:
        parts = [_DEFAULT_SLICE, unit]
    for i, part in enumerate(parts):
        if not part or len(part) > 255 or part in (".", "..") or not _UNIT_RE.fullmatch(part):
            raise RulesetError(
                f"selector {selector!r}: unit {unit!r} is not a systemd unit name or slice path "
                f"(component {part!r})")
        last = i == len(parts) - 1
        if not last and not part.endswith(".slice"):
            raise RulesetError(
                f"selector {selector!r}: unit {unit!r}: {part!r} must be a .slice to contain units")
        if last and not part.endswith(_UNIT_SUFFIXES):
            raise RulesetError(
                f"selector {selector!r}: unit {unit!r} must end in one of {', '.join(_UNIT_SUFFIXES)}")
    return "/".join(parts)


@dataclass(frozen=True)
class Selector:
    """One protected flow class: locally generated packets matching all given fields."""

    name: str
    destination: IPNetwork
    source: IPNetwork | None = None
    protocol: Protocol = Protocol.ANY
    ports: tuple[int, int] | None = None
    """Inclusive destination port range; needs protocol tcp or udp."""
    unit: str | None = None
    """systemd unit whose sockets' packets match (xt_cgroup ``--path``), e.g. ``ros2-control.service``
    (placed in ``system.slice``) or ``user.slice/user-1000.slice/app.scope``."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise RulesetError(
                f"selector name {self.name!r}: 1-64 characters of letters, digits, '_.:-', "
                "starting with a letter or digit")
        if not isinstance(self.destination, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise RulesetError(f"selector {self.name!r}: destination must be an IP network, "
                               f"got {self.destination!r}")
        if self.source is not None:
            if not isinstance(self.source, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise RulesetError(f"selector {self.name!r}: source must be an IP network, "
                                   f"got {self.source!r}")
            if self.source.version != self.destination.version:
                raise RulesetError(
                    f"selector {self.name!r}: source {self.source} is IPv{self.source.version} but "
                    f"destination {self.destination} is IPv{self.destination.version}")
        if not isinstance(self.protocol, Protocol):
            raise RulesetError(f"selector {self.name!r}: protocol must be tcp, udp or any, "
                               f"got {self.protocol!r}")
        if self.ports is not None:
            if self.protocol is Protocol.ANY:
                raise RulesetError(
                    f"selector {self.name!r}: a port range needs protocol tcp or udp, not any")
            lo, hi = self.ports
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 65535):
                raise RulesetError(
                    f"selector {self.name!r}: port range {lo}-{hi} must satisfy 1 <= low <= high "
                    "<= 65535")
        if self.unit is not None:
            _cgroup_path(self.name, self.unit)

    @property
    def family(self) -> int:
        return self.destination.version

    @classmethod
    def parse(cls, name: str, destination: str, *, source: str | None = None,
              protocol: str = "any", ports: str | int | tuple[int, int] | None = None,
              unit: str | None = None) -> Selector:
        """Build from config strings: ``"10.0.0.0/8"``, ``"udp"``, ``"7400-7500"`` or ``7400``."""

        def net(field_name: str, text: str) -> IPNetwork:
            try:
                return ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                raise RulesetError(f"selector {name!r}: {field_name} {text!r}: {exc}") from None

        try:
            proto = Protocol(protocol.lower())
        except ValueError:
            raise RulesetError(
                f"selector {name!r}: protocol {protocol!r} is not one of tcp, udp, any") from None
        port_range: tuple[int, int] | None
        if ports is None:
            port_range = None
        elif isinstance(ports, int):
            port_range = (ports, ports)
        elif isinstance(ports, tuple):
            port_range = ports
        else:
            lo, sep, hi = ports.partition("-")
            try:
                port_range = (int(lo), int(hi) if sep else int(lo))
            except ValueError:
                raise RulesetError(
                    f"selector {name!r}: ports {ports!r} is not a port or a range 'low-high'") from None
        return cls(name=name, destination=net("destination", destination),
                   source=net("source", source) if source is not None else None,
                   protocol=proto, ports=port_range, unit=unit)

    def match(self) -> str:
        """The iptables match for this selector (without chain or target)."""
        parts: list[str] = []
        if self.source is not None:
            parts.append(f"-s {self.source.with_prefixlen}")
        parts.append(f"-d {self.destination.with_prefixlen}")
        if self.protocol is not Protocol.ANY:
            parts.append(f"-p {self.protocol.value}")
            if self.ports is not None:
                lo, hi = self.ports
                spec = str(lo) if lo == hi else f"{lo}:{hi}"
                parts.append(f"-m {self.protocol.value} --dport {spec}")
        if self.unit is not None:
            parts.append(f"-m cgroup --path {_cgroup_path(self.name, self.unit)}")
        parts.append(f'-m comment --comment "tg:{self.name}"')
        return " ".join(parts)


@dataclass(frozen=True)
class Ruleset:
    """Everything needed to render both families' rules."""

    selectors: tuple[Selector, ...]
    queue_num: int
    fail_mode: FailMode = FailMode.OPEN
    mark: int = 0x10000
    """Bits the pacer sets on released packets and on dummies (SO_MARK)."""
    mask: int = 0x10000
    queue_count: int = 1
    """More than one spreads flows over queues N..N+count-1 (``--queue-balance``, one pacer each)."""

    def __post_init__(self) -> None:
        if not isinstance(self.selectors, tuple):
            object.__setattr__(self, "selectors", tuple(self.selectors))
        if not self.selectors:
            raise RulesetError("a rule set needs at least one selector")
        for sel in self.selectors:
            if not isinstance(sel, Selector):
                raise RulesetError(f"not a Selector: {sel!r}")
        names = [s.name for s in self.selectors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RulesetError(f"duplicate selector names: {', '.join(dup)}")
        if not isinstance(self.fail_mode, FailMode):
            raise RulesetError(f"fail mode must be open or closed, got {self.fail_mode!r}")
        if not (isinstance(self.queue_count, int) and self.queue_count >= 1):
            raise RulesetError(f"queue count {self.queue_count!r} must be >= 1")
        if not (isinstance(self.queue_num, int)
                and self.queue_num >= 0 and self.queue_num + self.queue_count - 1 <= 65535):
            raise RulesetError(
                f"queue numbers {self.queue_num}..{self.queue_num + self.queue_count - 1} must lie "
                "within 0..65535")
        if not (isinstance(self.mask, int) and 0 < self.mask <= 0xFFFFFFFF):
            raise RulesetError(f"mark mask {self.mask!r} must be a non-zero 32-bit value")
        if not (isinstance(self.mark, int) and self.mark != 0 and self.mark & ~self.mask == 0):
            raise RulesetError(
                f"mark {self.mark:#x} must be non-zero and inside mask {self.mask:#x}"
                if isinstance(self.mark, int) else f"mark {self.mark!r} must be an integer")

    def for_family(self, family: int) -> tuple[Selector, ...]:
        return tuple(s for s in self.selectors if s.family == family)

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(f for f in (4, 6) if self.for_family(f))

    def target(self) -> str:
        if self.queue_count == 1:
            queue = f"--queue-num {self.queue_num}"
        else:
            queue = f"--queue-balance {self.queue_num}:{self.queue_num + self.queue_count - 1}"
        bypass = " --queue-bypass" if self.fail_mode is FailMode.OPEN else ""
        return f"-j NFQUEUE {queue}{bypass}"


def render(ruleset: Ruleset, family: int, jumps_present: int = 0) -> str:
    """``iptables-restore --noflush`` text for one family (4 or 6).

    ``jumps_present`` is how many ``OUTPUT -j TENSORGUARD-OUTPUT`` rules the table has now (from
    `list_ours`): none → the jump is inserted first in OUTPUT; more than one (never made by us,
    but repaired) → the extras are deleted, so exactly one remains.
    """
    if family not in (4, 6):
        raise RulesetError(f"family must be 4 or 6, got {family!r}")
    lines = [f"*{TABLE}"]
    lines += [f":{chain} - [0:0]" for chain in OUR_CHAINS]
    lines += [f"-F {chain}" for chain in OUR_CHAINS]
    lines.append(f"-A {CHAIN_OUTPUT} -o lo -j RETURN")
    lines.append(f"-A {CHAIN_OUTPUT} -m mark --mark {ruleset.mark:#x}/{ruleset.mask:#x} -j RETURN")
    lines += [f"-A {CHAIN_OUTPUT} {sel.match()} -j {CHAIN_PROTECT}" for sel in ruleset.for_family(family)]
    lines.append(f"-A {CHAIN_PROTECT} {ruleset.target()}")
    if jumps_present == 0:
        lines.append(f"-I OUTPUT 1 -j {CHAIN_OUTPUT}")
    lines += [f"-D OUTPUT -j {CHAIN_OUTPUT}"] * max(0, jumps_present - 1)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(state: OurState) -> str | None:
    """Restore text that deletes the jump(s) and our chains; None when there is nothing of ours."""
    if not state.jumps and not state.chains:
        return None
    lines = [f"*{TABLE}"]
    lines += [f"-D OUTPUT -j {CHAIN_OUTPUT}"] * state.jumps
    chains = sorted(state.chains)
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_restore(state: OurState) -> str:
    """Restore text that puts our chains back to ``state`` (non-empty; used for rollback)."""
    lines = [f"*{TABLE}"]
    chains = sorted(state.chains)
    lines += [f":{chain} - [0:0]" for chain in chains]
    lines += [f"-F {chain}" for chain in chains]
    lines += [rule for chain in chains for rule in state.chains[chain]]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass
class OurState:
    """What of ours one family's ``mangle`` table holds."""

    family: int
    jumps: int = 0
    chains: dict[str, list[str]] = field(default_factory=dict)
    """Chain name → its rules as iptables-save prints them (``-A CHAIN ...``)."""

    @property
    def empty(self) -> bool:
        return not self.jumps and not self.chains


def parse_save(family: int, text: str) -> OurState:
    """Extract our chains and jumps from ``iptables-save -t mangle`` output."""
    state = OurState(family)
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_table = line == f"*{TABLE}"
        elif not in_table:
            continue
        elif line.startswith(f":{CHAIN_PREFIX}"):
            state.chains.setdefault(line[1:].split()[0], [])
        elif line == JUMP_RULE:
            state.jumps += 1
        elif line.startswith(f"-A {CHAIN_PREFIX}"):
            state.chains.setdefault(line.split()[1], []).append(line)
    return state


# ---------------------------------------------------------------------------------------------
# Adapter


def _tool(family: int, kind: str) -> str:
    return ("iptables" if family == 4 else "ip6tables") + kind


def _run(cmd: Sequence[str], netns: str | None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    try:
        return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30,
                              check=False)
    except FileNotFoundError as exc:
        raise IptablesError(f"{full[0]} not found: {exc}") from None


def _restore(family: int, text: str, netns: str | None, test: bool = False) -> None:
    cmd = [_tool(family, "-restore"), "--noflush", "--wait"]
    if test:
        cmd.append("--test")
    proc = _run(cmd, netns, stdin=text)
    if proc.returncode != 0:
        what = "rejected (test)" if test else "failed; nothing was changed"
        raise IptablesError(f"{cmd[0]} {what}: {proc.stderr.strip() or proc.stdout.strip()}")


def list_ours(netns: str | None = None, families: Iterable[int] = (4, 6)) -> dict[int, OurState]:
    """Our chains and jump rules per family, read with ``iptables-save -t mangle``."""
    out: dict[int, OurState] = {}
    for family in families:
        proc = _run([_tool(family, "-save"), "-t", TABLE], netns)
        if proc.returncode != 0:
            raise IptablesError(f"{_tool(family, '-save')} failed: {proc.stderr.strip()}")
        out[family] = parse_save(family, proc.stdout)
    return out


def check(ruleset: Ruleset, netns: str | None = None) -> None:
    """``iptables-restore --test`` the rule set: raises IptablesError, changes nothing.

    With iptables-nft this checks syntax and match/target options; what only the kernel can
    refuse (e.g. a cgroup path that vanished) still surfaces in `apply`."""
    states = list_ours(netns)
    for family in ruleset.families:
        _restore(family, render(ruleset, family, states[family].jumps), netns, test=True)


def apply(ruleset: Ruleset, netns: str | None = None) -> None:
    """Install or atomically replace the rule set (per family, one restore transaction each).

    Families without selectors get our chains removed (a re-apply may have dropped them). Every
    family's text is first checked with ``--test``; a rule set iptables rejects raises
    `IptablesError`, and nothing is changed: each family's commit is atomic, and when the kernel
    rejects the second family after the first was committed, the first is rolled back.
    """
    states = list_ours(netns)
    texts = {f: render(ruleset, f, states[f].jumps) for f in ruleset.families}
    for family, text in texts.items():
        _restore(family, text, netns, test=True)
    done: list[int] = []
    for family, text in texts.items():
        try:
            _restore(family, text, netns)
        except IptablesError:
            for prev in done:
                _rollback(states[prev], netns)
            raise
        done.append(family)
    for family in (4, 6):
        if family not in texts:
            cleanup = render_remove(states[family])
            if cleanup is not None:
                _restore(family, cleanup, netns)


def _rollback(previous: OurState, netns: str | None) -> None:
    if previous.empty:
        current = list_ours(netns, (previous.family,))[previous.family]
        text = render_remove(current)
        if text is not None:
            _restore(previous.family, text, netns)
    else:
        _restore(previous.family, render_restore(previous), netns)


def remove(netns: str | None = None) -> None:
    """Delete the jump and our chains in both families; a no-op when none are there."""
    for family, state in list_ours(netns).items():
        text = render_remove(state)
        if text is not None:
            _restore(family, text, netns)
