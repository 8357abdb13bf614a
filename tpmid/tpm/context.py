"""One ESAPI context on one TCTI: :class:`TpmContext`, the base of every TPM operation.

The context receives its TCTI string (STYLE.md §3): ``device:/dev/tpmrm0``
(the kernel resource manager, the default), ``device:/dev/tpm0``,
``swtpm:host=127.0.0.1,port=2321``, ``mssim:...`` or ``tabrmd:...``; the string
goes to tpm2-tss's TCTI loader unchanged.

After a power loss a TPM answers every command with TPM_RC_INITIALIZE until it
gets TPM2_Startup (TPM 2.0 Part 3 §9.3). Firmware normally sends it; on
boards and simulators where nobody did, the context sends TPM2_Startup(CLEAR)
once and goes on, which is what firmware would have done.

Without a resource manager a TPM holds only a few transient objects (three on
swtpm). Every function in :mod:`tpmid.tpm` flushes what it loads in a
``finally``; only a :class:`~tpmid.tpm.loaded.LoadedKey` keeps one until closed.

The modules of :mod:`tpmid.tpm` work on a :class:`TpmContext`; the layers above
use its subclass :class:`tpmid.tpm.connection.TpmConnection`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_RC, TPM2_SU, TSS2_RC
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPM2B_PUBLIC

from tpmid.errors import TpmError, TpmidError
from tpmid.store.ledger import LedgerEntry, TransientLedger
from tpmid.tpm.rc import LAYER_MASK, TCTI_LAYER, describe_error, is_code, tpm_call
from tpmid.tpm.tcti import SwtpmTcti, open_tcti
from tpmid.tpm.templates import template_fields

log = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"
# How long one TPM command may take before the connection is given up (tpm.timeout).
DEFAULT_COMMAND_TIMEOUT_S = 120.0

# TPM 2.0 Part 2 §6.13 (TPM_PT): fixed properties start at 0x100, variable at 0x200.
PT_MANUFACTURER = 0x105
PT_NV_BUFFER_MAX = 0x12C
# TPM_PT_FIXED properties never change for a TPM; the ones up to TPM_PT_NV_BUFFER_MAX
# are read once, in the context's start-up probe.
PT_FIXED_FIRST = 0x100
PT_FIXED_CACHED = PT_NV_BUFFER_MAX - PT_FIXED_FIRST + 1

# TPM 2.0 Part 2 §7.2 (TPM_HT) handle ranges.
TRANSIENT_FIRST = 0x80000000
PERSISTENT_FIRST = 0x81000000
NV_INDEX_FIRST = 0x01000000


@dataclass
class StaleTransients:
    """What :meth:`TpmContext.flush_stale_transients` did."""

    flushed: list[LedgerEntry] = field(default_factory=list)
    foreign: list[int] = field(default_factory=list)  # objects tpmid did not load: left alone

    def describe(self) -> str:
        """One line for the log and ``tpmid check``."""
        parts = []
        if self.flushed:
            pids = ", ".join(sorted({str(e.pid) for e in self.flushed}))
            parts.append(f"flushed {len(self.flushed)} transient object"
                         f"{'s' if len(self.flushed) != 1 else ''} left by killed tpmid "
                         f"process{'es' if ',' in pids else ''} (pid {pids})")
        if self.foreign:
            parts.append(f"left {len(self.foreign)} object{'s' if len(self.foreign) != 1 else ''} "
                         "that tpmid did not load alone")
        return "; ".join(parts) or "no leftover transient objects"


@dataclass(frozen=True)
class HierarchyPasswords:
    """Authorization values of the owner, endorsement and lockout hierarchies.

    Empty by default (a TPM as it leaves the factory). ``repr`` never shows them.
    """

    owner: bytes = field(default=b"", repr=False)
    endorsement: bytes = field(default=b"", repr=False)
    lockout: bytes = field(default=b"", repr=False)


NO_PASSWORDS = HierarchyPasswords()


def _unreachable(tcti: str, exc: BaseException) -> TpmError:
    rc = getattr(exc, "rc", None)
    module = tcti.split(":", 1)[0] or tcti
    text = str(exc).strip() or type(exc).__name__
    if (rc is not None and int(rc) & LAYER_MASK == TCTI_LAYER
            and int(rc) & 0xFFFF == int(TSS2_RC.BASE_RC_NOT_SUPPORTED)):
        return TpmError(
            f"cannot load the TCTI module {module!r} for {tcti!r} (is libtss2-tcti-{module} "
            "installed?)",
            rc=rc,
            hint="use device:/dev/tpmrm0, swtpm:host=...,port=..., mssim:... or tabrmd:...",
        )
    hint = "check that the TPM or simulator is running and that this user may open it"
    if module == "device":
        hint = ("check that the device exists and is readable by this user "
                "(usually group 'tss'); prefer /dev/tpmrm0, the kernel resource manager")
    return TpmError(f"TPM not reachable through TCTI {tcti!r}: {text}", rc=rc, hint=hint)


# ESAPI calls after which persistent handles may hold something else (TPM 2.0 Part 3
# §24.6 TPM2_Clear evicts the owner's persistent objects).
_FORGETTING = frozenset({"clear", "clear_control", "change_eps", "change_pps"})


class _StartingEsapi:
    """ESAPI that sends TPM2_Startup(CLEAR) once if a command finds the TPM uninitialised.

    After a power loss a TPM answers everything with TPM_RC_INITIALIZE until it gets
    TPM2_Startup (TPM 2.0 Part 3 §9.3); firmware normally sends it. Handling that on
    the first failing command, instead of probing every new connection, keeps a
    connection free of TPM commands.
    """

    def __init__(self, esapi: ESAPI, context: TpmContext) -> None:
        self._esapi = esapi
        self._context = context

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._esapi, name)
        if not callable(attr) or name.startswith("tr_") or name == "startup":
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in _FORGETTING:
                # Persistent objects may vanish: what the connection knew of them goes.
                self._context._forget_persistent()
            try:
                return attr(*args, **kwargs)
            except TSS2_Exception as e:
                if self._context._started or not is_code(e, TPM2_RC.INITIALIZE):
                    raise
            self._context._startup()
            return attr(*args, **kwargs)

        return call


class TpmContext:
    """One ESAPI context on one TCTI, with a lock and the hierarchy passwords.

    Use as a context manager or call :meth:`close`. Every ESAPI call made from
    more than one thread must hold :attr:`lock` (an ``RLock``; the functions in
    :mod:`tpmid.tpm` take it themselves).
    """

    def __init__(self, tcti: str = DEFAULT_TCTI,
                 passwords: HierarchyPasswords = NO_PASSWORDS, *,
                 timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
                 ledger: TransientLedger | None = None) -> None:
        self.tcti = tcti
        # Records this process's transient objects (TPMs without a resource manager).
        self.ledger = ledger
        self._tracked: dict[int, int] = {}  # ESYS_TR -> TPM handle
        self.passwords = passwords
        self.lock = threading.RLock()
        self._esapi: ESAPI | None = None
        # ESAPI keeps one ESYS_TR per TPM handle and TR_FromTPMPublic returns the same
        # one again; closing it for one user would break every other user, so
        # persistent objects and NV indices are reference-counted here.
        self._trs: dict[int, tuple[Any, int]] = {}
        # Set by tpmid.tpm.keyfile.storage_parent_scope: the storage parent kept loaded
        # across the key-file operations of one enrollment.
        self.parent_scope: dict[str, Any] | None = None
        self._fixed: dict[int, int] = {}
        # swtpm strings get tpmid's own TCTI with a command timeout (tpmid.tpm.tcti).
        self._tcti = open_tcti(tcti, timeout)
        try:
            self._esapi = ESAPI(self._tcti)
        except TSS2_Exception as e:
            raise _unreachable(tcti, e) from e
        except (RuntimeError, ValueError) as e:
            raise TpmError(
                f"{tcti!r} is not a TCTI string",
                hint="use device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321, mssim:... "
                "or tabrmd:...",
            ) from e
        try:
            esapi = self._esapi
            # The values go into the ESAPI context only; never logged.
            esapi.tr_set_auth(ESYS_TR.OWNER, passwords.owner)
            esapi.tr_set_auth(ESYS_TR.ENDORSEMENT, passwords.endorsement)
            esapi.tr_set_auth(ESYS_TR.LOCKOUT, passwords.lockout)
        except BaseException:
            self.close()
            raise
        # No probe command: the first command that finds the TPM uninitialised sends
        # TPM2_Startup itself (see _StartingEsapi); a connection costs no TPM command.
        self._started = False
        self._proxy = _StartingEsapi(self._esapi, self)

    # ------------------------------------------------------------------ lifetime

    @property
    def esapi(self) -> ESAPI:
        """The ESAPI context; TpmError once the context is closed."""
        if self._esapi is None:
            raise TpmError(f"the TPM connection to {self.tcti} is already closed")
        return cast(ESAPI, self._proxy)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._esapi is None

    def close(self) -> None:
        """Finalize the ESAPI context and its TCTI; idempotent."""
        with self.lock:
            self._trs.clear()
            if self._esapi is not None:
                esapi, self._esapi = self._esapi, None
                esapi.close()
            if isinstance(self._tcti, SwtpmTcti):
                self._tcti.close()

    def transport_error(self) -> TpmidError | None:
        """Why the connection to the TPM is unusable (no answer in time, lost), if it is.

        Once set, every further command fails with it; :func:`tpmid.tpm.rc.tpm_call`
        raises it instead of the TCTI's generic return code.
        """
        if not isinstance(self._tcti, SwtpmTcti):
            return None
        return self._tcti.failure or self._tcti.error

    def open_handle(self, handle: int, what: str) -> Any:
        """An ESYS_TR for the persistent object or NV index ``handle``; pair with close_handle."""
        with self.lock:
            entry = self._trs.get(handle)
            if entry is not None:
                self._trs[handle] = (entry[0], entry[1] + 1)
                return entry[0]
            with tpm_call(f"opening {what}", self, handles=(what,)):
                tr = self.esapi.tr_from_tpmpublic(handle)
            self._trs[handle] = (tr, 1)
            return tr

    def public_of(self, tr: Any) -> Any:
        """The public area ESAPI read when it opened ``tr`` (TPM2B_PUBLIC or TPM2B_NV_PUBLIC).

        TR_FromTPMPublic already sent TPM2_ReadPublic (NV_ReadPublic for an NV index)
        and keeps the answer; tpm2-pytss does not expose it, but ESAPI's serialized
        form of the object (the format tpm2-tools saves contexts in: handle, Name,
        resource type, public area) holds it. It is used only if its Name is the
        object's, so a misread never passes. None: ask the TPM instead.
        """
        try:
            data = bytes(self.esapi.tr_serialize(tr))
            name_len = int.from_bytes(data[4:6], "big")
            offset = 4 + 2 + name_len + 4  # handle, TPM2B_NAME, resource type
            name = bytes(self.esapi.tr_get_name(tr))
            for kind in (TPM2B_PUBLIC, TPM2B_NV_PUBLIC):
                try:
                    public, _ = kind.unmarshal(data[offset:])
                    area = public.publicArea if kind is TPM2B_PUBLIC else public.nvPublic
                    if bytes(area.get_name()) == name:
                        return public
                except Exception:  # noqa: BLE001, S112 - not this kind of public area
                    continue
        except Exception as e:  # noqa: BLE001 - any surprise: ask the TPM
            log.debug("public area of %r not taken from ESAPI: %s", tr, e)
        return None

    def close_handle(self, handle: int, tr: Any, *, forget: bool = False) -> None:
        """Release ``tr`` from :meth:`open_handle`; ``forget`` drops it for every user.

        The ESYS_TR of a persistent object stays known to the connection (a later
        open costs no TPM2_ReadPublic): while a connection is open the host TPM lock
        is held, so nobody else can change what is at the handle. ``forget`` is for an object
        that no longer exists (evicted): ESAPI's record of it must go, or the next
        TR_FromTPMPublic of the handle fails.
        """
        with self.lock:
            entry = self._trs.get(handle)
            if entry is None or entry[0] != tr:
                return  # already forgotten (evicted while this user still held it)
            if entry[1] > 1 and not forget:
                self._trs[handle] = (tr, entry[1] - 1)
                return
            if not forget and handle >> 24 == PERSISTENT_FIRST >> 24:
                # A persistent object stays known; NV indices change when written.
                self._trs[handle] = (tr, 0)
                return
            del self._trs[handle]
            if self._esapi is not None:
                self._esapi.tr_close(tr)

    def _forget_persistent(self) -> None:
        with self.lock:
            for handle, (tr, count) in list(self._trs.items()):
                if handle >> 24 == PERSISTENT_FIRST >> 24 and count == 0:
                    del self._trs[handle]
                    if self._esapi is not None:
                        self._esapi.tr_close(tr)

    def remember_handle(self, handle: int, tr: Any) -> None:
        """Keep the ESYS_TR a command returned for ``handle`` (EvictControl's new object)."""
        with self.lock:
            old = self._trs.get(handle)
            if old is not None and old[0] != tr and self._esapi is not None:
                self._esapi.tr_close(old[0])
            self._trs[handle] = (tr, 0)

    def __enter__(self) -> TpmContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._esapi is None else "open"
        return f"{type(self).__name__}({self.tcti!r}, {state})"

    def _startup(self) -> None:
        """TPM2_Startup(CLEAR), once per connection, for a TPM that answered TPM_RC_INITIALIZE."""
        self._started = True
        # TPM 2.0 Part 3 §9.3: after _TPM_Init only TPM2_Startup is accepted.
        log.info("TPM on %s needs TPM2_Startup after a reset; sending Startup(CLEAR)", self.tcti)
        assert self._esapi is not None
        try:
            self._esapi.startup(TPM2_SU.CLEAR)
        except TSS2_Exception as e:
            raise self.error("starting the TPM (TPM2_Startup)", e) from e

    def fixed_property(self, prop: int) -> int | None:
        """A TPM_PT_FIXED property (constant for this TPM); read once per connection."""
        if PT_FIXED_FIRST <= prop < PT_FIXED_FIRST + PT_FIXED_CACHED:
            if not self._fixed:
                self._fixed = self.properties(PT_FIXED_FIRST, PT_FIXED_CACHED)
            return self._fixed.get(prop)
        return self.properties(prop, 1).get(prop)

    # ------------------------------------------------------------------ queries

    def error(self, what: str, exc: BaseException, handles: tuple[str, ...] = ()) -> TpmError:
        """The :class:`TpmError` for TSS2 exception ``exc`` raised while doing ``what``."""
        return describe_error(what, exc, self, handles)

    def properties(self, first: int, count: int) -> dict[int, int]:
        """TPM_PT properties ``first`` .. ``first+count-1`` that the TPM reports."""
        out: dict[int, int] = {}
        prop = first
        with self.lock, tpm_call("reading TPM properties", self):
            while True:
                more, data = self.esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, prop,
                                                       first + count - prop)
                props = list(data.data.tpmProperties)
                for p in props:
                    if p.property < first + count:
                        out[int(p.property)] = int(p.value)
                if not more or not props or props[-1].property + 1 >= first + count:
                    return out
                prop = int(props[-1].property) + 1

    def handles(self, first: int) -> list[int]:
        """All handles the TPM lists in the range (type byte) that ``first`` starts."""
        kind = first >> 24
        out: list[int] = []
        start = first
        with self.lock, tpm_call("listing TPM handles", self):
            while True:
                more, data = self.esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
                batch = [int(h) for h in data.data.handles]
                out.extend(h for h in batch if h >> 24 == kind)
                if not more or not batch or batch[-1] >> 24 != kind:
                    return out
                start = batch[-1] + 1

    def transient_handles(self) -> list[int]:
        """Handles of the transient objects currently loaded in the TPM."""
        return self.handles(TRANSIENT_FIRST)

    @contextlib.contextmanager
    def creating(self, what: str, *, template: Any = None, public: Any = None) -> Iterator[None]:
        """Around a command that creates or loads a transient object: ledger it first.

        ``template`` (a TPM2B_PUBLIC/TPMT_PUBLIC the object is made from) or
        ``public`` (the public area of a key being loaded) lets a later clean-up
        recognise the object if this process dies before :meth:`track` records it.
        """
        if self.ledger is None:
            yield
            return
        if public is not None:
            area = public.publicArea if hasattr(public, "publicArea") else public
            match = "name:" + bytes(area.get_name()).hex()
        else:
            match = "fields:" + template_fields(template).hex()
        self.ledger.expect(match, what)
        try:
            yield
        except BaseException:
            self.ledger.settle()
            raise

    def track(self, tr: Any, what: str) -> None:
        """Record a transient object this process just loaded in the ledger (if any)."""
        if self.ledger is None:
            return
        with self.lock:
            handle = int(self.esapi.tr_get_tpm_handle(tr))
            self._tracked[int(tr)] = handle
            self.ledger.add(handle, bytes(self.esapi.tr_get_name(tr)), what)

    def forget(self, tr: Any) -> None:
        """Drop a flushed transient object from the ledger."""
        handle = self._tracked.pop(int(tr), None)
        if handle is not None and self.ledger is not None:
            self.ledger.remove(handle)

    def flush_stale_transients(self, *, survey: bool = False) -> StaleTransients:
        """Flush the transient objects dead tpmid processes left; leave everything else.

        With the host-wide TPM lock held (start-up recovery, ``tpmid check``):
        without a resource manager a tpmid process killed while it held the TPM
        leaves its objects in the TPM's few slots (3 on swtpm) until a reset. The
        ledger (:mod:`tpmid.store.ledger`) says which objects a tpmid process loaded
        and whether it is still alive; an object is flushed only if it is the one
        recorded (same Name) and its process is gone. Under a resource manager
        (``/dev/tpmrm0``, tabrmd) there is no ledger and nothing to do.

        An empty ledger means there is nothing of tpmid's to flush: no TPM command is
        sent then, unless ``survey`` asks to count the other programs' objects too
        (``tpmid check``).
        """
        result = StaleTransients()
        if self.ledger is None:
            return result
        entries = self.ledger.entries()
        if not entries and not survey:
            return result
        present = set(self.transient_handles())
        recorded = {e.handle for e in entries if not e.pending}
        kept: list[LedgerEntry] = []
        for entry in entries:
            if entry.pending:
                if entry.alive:
                    kept.append(entry)
                else:  # killed between the TPM's answer and the ledger's update
                    self._flush_unrecorded(entry, present - recorded, result)
                continue
            if entry.handle not in present:
                continue  # flushed, or the TPM was reset since
            if entry.alive:
                kept.append(entry)
                continue
            with self.lock, tpm_call(f"flushing stale transient object {entry.handle:#x}", self):
                tr = self.esapi.tr_from_tpmpublic(entry.handle)
                if bytes(self.esapi.tr_get_name(tr)).hex() != entry.name:
                    self.esapi.tr_close(tr)  # another object took the slot since
                    continue
                self.esapi.flush_context(tr)
            present.discard(entry.handle)
            result.flushed.append(entry)
        self.ledger.keep_only(kept)
        result.foreign = sorted(present - {e.handle for e in kept}
                                - {e.handle for e in result.flushed})
        return result

    def _flush_unrecorded(self, entry: LedgerEntry, candidates: set[int],
                          result: StaleTransients) -> None:
        """Flush the one unrecorded object that a dead process's pending entry describes."""
        kind, _, value = entry.match.partition(":")
        for handle in sorted(candidates - {e.handle for e in result.flushed}):
            with self.lock, tpm_call(f"reading transient object {handle:#x}", self):
                tr = self.esapi.tr_from_tpmpublic(handle)
                if kind == "name":
                    same = bytes(self.esapi.tr_get_name(tr)).hex() == value
                else:
                    public, _, _ = self.esapi.read_public(tr)
                    same = template_fields(public).hex() == value
                if not same:
                    self.esapi.tr_close(tr)
                    continue
                self.esapi.flush_context(tr)
            result.flushed.append(LedgerEntry(handle, "", entry.what, entry.pid, entry.start))
            return

    def persistent_handles(self) -> list[int]:
        """Handles of all persistent objects (0x81xxxxxx)."""
        return self.handles(PERSISTENT_FIRST)

    def nv_indices(self) -> list[int]:
        """All defined NV indices (0x01xxxxxx)."""
        return self.handles(NV_INDEX_FIRST)
