"""The identity unit: keeps the robot's certificate current and serves identity.* on its socket.

The loop asks the renewal scheduler when to act, runs the blocking issuance in a worker thread,
and sleeps at most the scheduler's ``sleep_for()`` (so a resume from suspend is noticed within a
minute). Without a certificate, or after it expired, it enrols with the bootstrap token file when
one is present, and otherwise waits for `tgctl identity enrol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import random
import socket
import stat
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, LoadedConfig
from ..config.schema import IdentitySettings
from ..control import RpcError, export
from ..control.protocol import CONFIG_INVALID, UNAVAILABLE
from ..service.metrics import Family
from ..service.unit import SubsystemState, UnitService
from .audit import AuditError, AuditLog, EntryKind, load_or_create_signer_key
from .audit.log import VerifyError
from .clocks import SystemClocks
from .credentials import CredentialManager, Current, IdentityError
from .renewal import Phase, RenewalPolicy, RenewalScheduler

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096


def node_id_of(loaded: LoadedConfig) -> str:
    return loaded.config.agent.node_id or socket.gethostname().split(".")[0].lower()


def read_token_file(path: Path) -> str | None:
    """The bootstrap token, if the file exists; refuses a file others may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read the bootstrap token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if st.st_mode & 0o007:
            raise IdentityError(f"bootstrap token file {path} is readable by others "
                                f"(mode {stat.S_IMODE(st.st_mode):#o}): chmod 0600 it")
        data = handle.read(MAX_TOKEN_BYTES + 1)
    token = data.decode("ascii", "replace").strip()
    if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise IdentityError(f"bootstrap token file {path} does not hold one token")
    return token


class IdentityService(UnitService):
    """Machine identity: enrolment, renewal, sinks and the audit log."""

    name = "identity"
    section = "identity"

    manager: CredentialManager | None = None
    scheduler: RenewalScheduler | None = None
    audit: AuditLog | None = None
    loop_task: asyncio.Task[None] | None = None
    last_error: str | None = None
    renewals = 0
    failures = 0
    _wake: asyncio.Event | None = None
    _busy: asyncio.Lock | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def _refusal(self, loaded: LoadedConfig) -> ConfigError | None:
        settings = loaded.config.identity
        if not settings.enabled:
            return None
        issues = []
        if not Path(settings.trust_anchor).is_file():
            issues.append(loaded.issue("identity.trust_anchor", "no such file: install the fleet CA's "
                                       "root certificate there", f'"{settings.trust_anchor}"'))
        for i, sink in enumerate(settings.sink):
            for key, name, lookup in (("owner", sink.owner, pwd.getpwnam),
                                      ("group", sink.group, grp.getgrnam)):
                if name is None:
                    continue
                try:
                    lookup(name)
                except KeyError:
                    issues.append(loaded.issue(f"identity.sink[{i}].{key}", f"no such {key}",
                                               f'"{name}"'))
        return ConfigError(issues) if issues else None

    def _build(self, loaded: LoadedConfig) -> None:
        settings = loaded.config.identity
        node_id = node_id_of(loaded)
        state = Path(settings.state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        clocks = SystemClocks()
        if self.audit is None:
            origin = f"{settings.trust_domain}/robot/{node_id}/identity-audit"
            signer = load_or_create_signer_key(state / "audit.key", origin)
            self.audit = AuditLog.open(state / "audit", signer, origin, time.time)
        self.manager = CredentialManager(settings, node_id, clocks, self.audit)
        self.scheduler = RenewalScheduler(self._policy(settings), clocks, random.SystemRandom())
        current = self.manager.current()
        if current is not None:
            self.scheduler.load(current.validity, current.anchor)

    @staticmethod
    def _policy(settings: IdentitySettings) -> RenewalPolicy:
        return RenewalPolicy(fraction=settings.renew_fraction, jitter=min(settings.renew_jitter,
                                                                           settings.renew_fraction / 2),
                             backoff_base_s=settings.retry_initial_s,
                             backoff_cap_s=settings.retry_max_s,
                             min_retry_s=min(5.0, settings.retry_initial_s),
                             backdate_s=settings.ca_backdate_s)

    async def start(self) -> None:
        refusal = self._refusal(self.store.current)
        if refusal is not None:
            raise refusal
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()
        if self.store.current.config.identity.enabled:
            await asyncio.to_thread(self._build, self.store.current)
            assert self.manager is not None
            await asyncio.to_thread(self.manager.prune_token_keys)
            problems = await asyncio.to_thread(self.manager.sync_sinks)
            self.last_error = "; ".join(problems) or None
            self.loop_task = asyncio.create_task(self._run(), name="identity-renewal")

    async def stop(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop_task
            self.loop_task = None
        if self._busy is not None:
            async with self._busy:  # an issuance in its worker thread finishes first
                pass
        if self.audit is not None:
            self.audit.close()
            self.audit = None

    def check_config(self, new: LoadedConfig) -> None:
        refusal = self._refusal(new)
        if refusal is not None:
            raise refusal

    def apply_config(self, new: LoadedConfig) -> None:
        settings = new.config.identity
        if not settings.enabled:
            if self.loop_task is not None:
                self.loop_task.cancel()
                self.loop_task = None
            self.manager = None
            self.scheduler = None
            return
        try:
            self._build(new)
        except (AuditError, OSError, ValueError) as exc:
            self.last_error = f"applying generation {self.store.generation} failed: {exc}"
            log.error("identity: %s", self.last_error)
            return
        assert self.audit is not None
        self.audit.append(EntryKind.CONFIG_CHANGE, {"node": node_id_of(new),
                                                    "generation": self.store.generation,
                                                    "sinks": [s.name for s in settings.sink]})
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._run(), name="identity-renewal")
        if self._wake is not None:
            self._wake.set()

    # -- the renewal loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        enrol_retry = 0.0
        while True:
            scheduler, manager = self.scheduler, self.manager
            if scheduler is None or manager is None:
                return
            for event in scheduler.events():
                log.warning("identity: %s", event)
            phase = scheduler.phase()
            if phase in (Phase.UNENROLLED, Phase.EXPIRED):
                sleep = await self._enrol_from_file(enrol_retry)
                enrol_retry = sleep
            elif scheduler.due():
                await self._renew()
                sleep = scheduler.sleep_for()
            else:
                sleep = scheduler.sleep_for()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(sleep, 0.05))
            self._wake.clear()

    async def _enrol_from_file(self, previous_delay: float) -> float:
        """Try the token file; returns how long to wait before looking again."""
        assert self.manager is not None
        path = Path(self.manager.settings.bootstrap_token_file)
        try:
            token = read_token_file(path)
        except IdentityError as exc:
            self.last_error = str(exc)
            return 60.0
        if token is None:
            return 60.0  # nothing to do until a token file appears or `tgctl identity enrol`
        try:
            await self._issue("enrol", token)
        except (IdentityError, RpcError):
            return min(max(previous_delay * 2, self.manager.settings.retry_initial_s),
                       self.manager.settings.retry_max_s)
        try:
            path.unlink()  # a used token is worthless; do not leave it lying around
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("identity: enrolled, but cannot remove the used bootstrap token %s (%s): "
                        "remove it by hand", path, exc.strerror)
        return 0.0

    async def _renew(self) -> None:
        assert self.scheduler is not None
        try:
            await self._issue("renew")
        except (IdentityError, RpcError):
            delay = self.scheduler.failed()
            log.warning("identity: next renewal attempt in %.0f s", delay)

    async def _issue(self, kind: str, token: str | None = None, *, operator: bool = False) -> Current:
        """One enrolment or renewal, serialised with any other, and the scheduler told.

        A failed ``operator`` request is answered to the operator and audited, but does not mark
        a still-valid identity as degraded."""
        assert self._busy is not None
        async with self._busy:
            manager, scheduler = self.manager, self.scheduler
            if manager is None or scheduler is None:
                raise RpcError(UNAVAILABLE, "identity is disabled")
            try:
                if kind == "enrol":
                    assert token is not None
                    current = await asyncio.to_thread(manager.enrol, token)
                else:
                    current = await asyncio.to_thread(manager.renew)
            except (IdentityError, OSError, AuditError) as exc:
                self.failures += 1
                if not operator:
                    self.last_error = str(exc)
                raise IdentityError(str(exc)) from None
            scheduler.load(current.validity, current.anchor)
            self.renewals += 1
            self.last_error = "; ".join(manager.sink_problems) or None
            return current

    # -- what tgctl shows -----------------------------------------------------------------------

    def subsystem(self) -> SubsystemState:
        settings = self.store.current.config.identity
        if not settings.enabled:
            return SubsystemState("disabled", "[identity] enabled = false")
        if self.manager is None or self.scheduler is None:
            return SubsystemState("starting", "loading the state directory", healthy=False)
        phase = self.scheduler.phase()
        current = self.manager.current()
        if current is None:
            return SubsystemState("unenrolled", "no certificate yet: waiting for a bootstrap token "
                                  f"in {settings.bootstrap_token_file} or `tgctl identity enrol`",
                                  healthy=False)
        left = current.validity.not_after - self.scheduler.now_ca()
        if phase == Phase.EXPIRED:
            return SubsystemState("expired", f"certificate {current.serial} expired "
                                  f"{-left:.0f} s ago: re-enrol with a new bootstrap token",
                                  healthy=False)
        detail = f"{self.manager.spiffe_id}, serial {current.serial}, expires in {left:.0f} s"
        if self.last_error:
            return SubsystemState("renewing" if phase == Phase.RENEWING else "degraded",
                                  f"{detail}; last error: {self.last_error}", healthy=False)
        return SubsystemState("valid", detail)

    def metric_families(self) -> list[Family]:
        families = [
            Family("tensorguard_identity_renewals_total", "Certificates obtained (enrolments and "
                   "renewals).", "counter").add(self.renewals),
            Family("tensorguard_identity_failures_total", "Failed enrolment or renewal attempts.",
                   "counter").add(self.failures),
        ]
        if self.manager is not None and self.scheduler is not None:
            current = self.manager.current()
            if current is not None:
                families.append(Family("tensorguard_identity_cert_expiry_seconds",
                                       "Seconds until the current certificate expires.")
                                .add(round(current.validity.not_after - self.scheduler.now_ca(), 3)))
        return families

    def _manager(self) -> CredentialManager:
        if self.manager is None:
            raise RpcError(UNAVAILABLE, f"identity is not running ({self.subsystem().detail})")
        return self.manager

    @export("identity.show", read_only=True)
    def identity_show(self) -> dict[str, Any]:
        """The current certificate, the renewal schedule and the sinks."""
        state = self.subsystem()
        out: dict[str, Any] = {"state": state.state, "detail": state.detail,
                               "renewals": self.renewals, "failures": self.failures,
                               "last_error": self.last_error}
        if self.manager is None or self.scheduler is None:
            return out
        out["spiffe_id"] = self.manager.spiffe_id
        current = self.manager.current()
        if current is not None:
            now = self.scheduler.now_ca()
            out.update({
                "serial": current.serial,
                "not_before": current.validity.not_before,
                "not_after": current.validity.not_after,
                "expires_in_s": round(current.validity.not_after - now, 3),
                "next_renewal_in_s": self.scheduler.next_attempt_in(),
                "phase": self.scheduler.phase().value,
                "sinks": [{"name": s.name, "kind": s.config.kind,
                           "current": s.installed_cert() == current.creds.cert
                           if s.directory is not None else None,
                           "reload": s.hook.describe()} for s in self.manager.sinks],
            })
        if self.audit is not None:
            out["audit_size"] = self.audit.size
        return out

    @export("identity.renew")
    async def identity_renew(self) -> dict[str, Any]:
        """Renew now over mTLS (whatever the schedule says); the sinks are reloaded."""
        self._manager()
        try:
            current = await self._issue("renew", operator=True)
        except IdentityError as exc:
            raise RpcError(UNAVAILABLE, str(exc)) from None
        return {"serial": current.serial, "not_after": current.validity.not_after}

    @export("identity.enrol")
    async def identity_enrol(self, token: str) -> dict[str, Any]:
        """Enrol (again) with a one-time bootstrap token: the way back after expiry."""
        self._manager()
        if not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise RpcError(CONFIG_INVALID, "the bootstrap token must be one word")
        try:
            current = await self._issue("enrol", token, operator=True)
        except IdentityError as exc:
            raise RpcError(UNAVAILABLE, str(exc)) from None
        if self._wake is not None:
            self._wake.set()
        return {"serial": current.serial, "not_after": current.validity.not_after}

    @export("identity.audit.verify", read_only=True)
    async def identity_audit_verify(self) -> dict[str, Any]:
        """Check every entry, the signed checkpoint and consistency with the last verified one."""
        if self.audit is None:
            raise RpcError(UNAVAILABLE, "identity is not running")
        try:
            result = await asyncio.to_thread(self.audit.verify)
        except VerifyError as exc:
            return {"ok": False, "check": exc.check, "index": exc.index, "error": str(exc)}
        return {"ok": True, "entries": result.entries, "size": result.size, "root": result.root.hex(),
                "seconds": round(result.seconds, 6),
                "previous_verified_size": result.previous_verified_size,
                "vkey": self.audit.verifier().vkey}

    @export("identity.audit.proof", read_only=True)
    def identity_audit_proof(self, index: int, size: int | None = None) -> dict[str, Any]:
        """Inclusion proof of entry ``index`` (in the tree of ``size``, default the latest)."""
        if self.audit is None:
            raise RpcError(UNAVAILABLE, "identity is not running")
        try:
            proof = self.audit.prove_inclusion(index, size)
        except (AuditError, ValueError, IndexError) as exc:
            raise RpcError(CONFIG_INVALID, str(exc)) from None
        return proof
