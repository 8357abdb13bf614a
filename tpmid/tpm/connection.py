"""One ESAPI context per :class:`TpmConnection`, and TSS2 errors as :class:`TpmError`.

The connection receives its TCTI string (STYLE.md §3): ``device:/dev/tpmrm0``
(the kernel resource manager, the default), ``device:/dev/tpm0``,
``swtpm:host=127.0.0.1,port=2321``, ``mssim:...`` or ``tabrmd:...``; the string
goes to tpm2-tss's TCTI loader unchanged.

After a power loss a TPM answers every command with TPM_RC_INITIALIZE until it
gets TPM2_Startup (TPM 2.0 Part 3 §9.3). Firmware normally sends it; on
boards and simulators where nobody did, the connection sends TPM2_Startup(CLEAR)
once and goes on, which is what firmware would have done.

Without a resource manager a TPM holds only a few transient objects (three on
swtpm). Every function in :mod:`tpmid.tpm` flushes what it loads in a
``finally``; only a :class:`~tpmid.tpm.keys.LoadedKey` keeps one until closed.

:func:`tpm_call` is the one place where TSS2 return codes become
:class:`~tpmid.errors.TpmError` messages a person can act on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpmid.errors import TpmError

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

log = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"

# TPM 2.0 Part 2 §6.6 (TPM_RC): format-zero codes keep all their bits, format-one
# codes carry a handle, parameter or session number in bits 8-11.
RC_FMT1 = 0x080
RC_INITIALIZE = 0x100
RC_FAILURE = 0x101
RC_DISABLED = 0x120
RC_NV_UNINITIALIZED = 0x14A
RC_ASYMMETRIC = 0x081
RC_ATTRIBUTES = 0x082
RC_HASH = 0x083
RC_VALUE = 0x084
RC_HIERARCHY = 0x085
RC_KEY_SIZE = 0x087
RC_MODE = 0x089
RC_TYPE = 0x08A
RC_HANDLE = 0x08B
RC_COMMAND_CODE = 0x143  # TPM_RC_COMMAND_CODE: the TPM does not implement the command
RC_KDF = 0x08C
RC_AUTH_FAIL = 0x08E
RC_SCHEME = 0x092
RC_SYMMETRIC = 0x096
RC_INTEGRITY = 0x09F
RC_BAD_AUTH = 0x0A2
RC_CURVE = 0x0A6
RC_OBJECT_MEMORY = 0x902
RC_OBJECT_HANDLES = 0x906
RC_LOCKOUT = 0x921
RC_NV_RATE = 0x920

# TSS2 layers (tss2_common.h): bits 16-23 of a TSS2_RC say who answered.
LAYER_TPM = 0
LAYER_ESAPI = 7 << 16
LAYER_SYS = 8 << 16
LAYER_TCTI = 10 << 16
LAYER_RESMGR = 11 << 16
LAYER_RESMGR_TPM = 12 << 16
BASE_RC_NOT_SUPPORTED = 0x15  # TSS2_BASE_RC_NOT_SUPPORTED: unknown TCTI module

# TPM 2.0 Part 2 §6.13 (TPM_PT): fixed properties start at 0x100, variable at 0x200.
PT_MANUFACTURER = 0x105
PT_HR_TRANSIENT_MIN = 0x10E
PT_NV_BUFFER_MAX = 0x12C
# TPM 2.0 Part 2 §6.13: TPM_PT_FIXED properties never change for a TPM; the ones up
# to TPM_PT_NV_BUFFER_MAX are read once, in the connection's start-up probe.
PT_FIXED_FIRST = 0x100
PT_FIXED_CACHED = PT_NV_BUFFER_MAX - PT_FIXED_FIRST + 1
PT_PERMANENT = 0x200
PT_LOCKOUT_COUNTER = 0x20E
PT_MAX_AUTH_FAIL = 0x20F
PT_LOCKOUT_INTERVAL = 0x210
PT_LOCKOUT_RECOVERY = 0x211

# TPM 2.0 Part 2 §7.2 (TPM_HT) handle ranges.
TRANSIENT_FIRST = 0x80000000
PERSISTENT_FIRST = 0x81000000
NV_INDEX_FIRST = 0x01000000

# Algorithm-support failures: the TPM does not implement what the template asks for.
UNSUPPORTED_RCS = {
    RC_ASYMMETRIC: "asymmetric algorithm",
    RC_HASH: "hash algorithm",
    RC_KEY_SIZE: "key size",
    RC_KDF: "key derivation function",
    RC_SCHEME: "signing scheme",
    RC_SYMMETRIC: "symmetric algorithm",
    RC_MODE: "symmetric mode",
    RC_CURVE: "ECC curve",
}


@dataclass(frozen=True)
class HierarchyPasswords:
    """Authorization values of the owner, endorsement and lockout hierarchies.

    Empty by default (a TPM as it leaves the factory). ``repr`` never shows them.
    """

    owner: bytes = field(default=b"", repr=False)
    endorsement: bytes = field(default=b"", repr=False)
    lockout: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class DecodedRc:
    """A TSS2 return code taken apart (TPM 2.0 Part 2 §6.6, TSS2 layers)."""

    rc: int
    layer: int
    code: int  # TPM_RC without handle/parameter/session number, or the TSS base code
    handle: int = 0  # 1-based handle number the error is about, 0 if none
    parameter: int = 0
    session: int = 0

    @property
    def from_tpm(self) -> bool:
        """True when the TPM itself (possibly through a resource manager) answered."""
        return self.layer in (LAYER_TPM, LAYER_RESMGR_TPM)


def decode_rc(rc: int) -> DecodedRc:
    """Split ``rc`` into layer, error code and the handle/parameter/session number."""
    layer = rc & 0xFF0000
    base = rc & 0xFFFF
    if layer not in (LAYER_TPM, LAYER_RESMGR_TPM):
        return DecodedRc(rc=rc, layer=layer, code=base)
    if base & RC_FMT1:
        code = RC_FMT1 | (base & 0x3F)
        n = (base >> 8) & 0xF
        if base & 0x040:
            return DecodedRc(rc=rc, layer=layer, code=code, parameter=n)
        if n & 0x8:
            return DecodedRc(rc=rc, layer=layer, code=code, session=n & 0x7)
        return DecodedRc(rc=rc, layer=layer, code=code, handle=n & 0x7)
    return DecodedRc(rc=rc, layer=layer, code=base)


def _tss_text(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


class TpmConnection:
    """One ESAPI context on one TCTI, with a lock and the hierarchy passwords.

    Use as a context manager or call :meth:`close`. Every ESAPI call made from
    more than one thread must hold :attr:`lock` (an ``RLock``; the functions in
    :mod:`tpmid.tpm` take it themselves).
    """

    def __init__(self, tcti: str = DEFAULT_TCTI,
                 passwords: HierarchyPasswords = HierarchyPasswords()) -> None:
        from tpm2_pytss import ESAPI, TSS2_Exception
        from tpm2_pytss.constants import ESYS_TR

        self.tcti = tcti
        self.passwords = passwords
        self.lock = threading.RLock()
        self._esapi: ESAPI | None = None
        # ESAPI keeps one ESYS_TR per TPM handle and TR_FromTPMPublic returns the same
        # one again; closing it for one user would break every other user, so
        # persistent objects and NV indices are reference-counted here.
        self._trs: dict[int, tuple[Any, int]] = {}
        # Set by tpmid.tpm.keys.storage_parent_scope: the storage parent kept loaded
        # across the key-file operations of one enrollment.
        self.parent_scope: dict[str, Any] | None = None
        self._fixed: dict[int, int] = {}
        try:
            self._esapi = ESAPI(tcti)
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
            self._ensure_started()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifetime

    @property
    def esapi(self) -> ESAPI:
        """The ESAPI context; TpmError once the connection is closed."""
        if self._esapi is None:
            raise TpmError(f"the TPM connection to {self.tcti} is already closed")
        return self._esapi

    def close(self) -> None:
        """Finalize the ESAPI context and its TCTI; idempotent."""
        with self.lock:
            self._trs.clear()
            if self._esapi is not None:
                esapi, self._esapi = self._esapi, None
                esapi.close()

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

    def close_handle(self, handle: int, tr: Any, *, forget: bool = False) -> None:
        """Release ``tr`` from :meth:`open_handle`; ``forget`` drops it for every user.

        ``forget`` is for an object that no longer exists (evicted): ESAPI's
        record of it must go, or the next TR_FromTPMPublic of the handle fails.
        """
        with self.lock:
            entry = self._trs.get(handle)
            if entry is None or entry[0] != tr:
                return  # already forgotten (evicted while this user still held it)
            if entry[1] > 1 and not forget:
                self._trs[handle] = (tr, entry[1] - 1)
                return
            del self._trs[handle]
            if self._esapi is not None:
                self._esapi.tr_close(tr)

    def __enter__(self) -> TpmConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._esapi is None else "open"
        return f"TpmConnection({self.tcti!r}, {state})"

    def _ensure_started(self) -> None:
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import TPM2_SU

        with self.lock:
            try:
                self._fixed = self.properties(PT_FIXED_FIRST, PT_FIXED_CACHED)
                return
            except TpmError as e:
                if e.rc is None or decode_rc(e.rc).code != RC_INITIALIZE:
                    raise
            # TPM 2.0 Part 3 §9.3: after _TPM_Init only TPM2_Startup is accepted.
            log.info("TPM on %s needs TPM2_Startup after a reset; sending Startup(CLEAR)", self.tcti)
            try:
                self.esapi.startup(TPM2_SU.CLEAR)
            except TSS2_Exception as e:
                raise self.error("starting the TPM (TPM2_Startup)", e) from e
            self._fixed = self.properties(PT_FIXED_FIRST, PT_FIXED_CACHED)

    def fixed_property(self, prop: int) -> int | None:
        """A TPM_PT_FIXED property (constant for this TPM); cached ones cost no command."""
        if PT_FIXED_FIRST <= prop < PT_FIXED_FIRST + PT_FIXED_CACHED and self._fixed:
            return self._fixed.get(prop)
        return self.properties(prop, 1).get(prop)

    # ------------------------------------------------------------------ queries

    def error(self, what: str, exc: BaseException, handles: Sequence[str] = ()) -> TpmError:
        """The :class:`TpmError` for TSS2 exception ``exc`` raised while doing ``what``."""
        return describe_error(what, exc, self, handles)

    def properties(self, first: int, count: int) -> dict[int, int]:
        """TPM_PT properties ``first`` .. ``first+count-1`` that the TPM reports."""
        from tpm2_pytss.constants import TPM2_CAP

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
        from tpm2_pytss.constants import TPM2_CAP

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

    def flush_stale_transients(self) -> list[int]:
        """Flush every transient object the TPM holds; return their handles.

        For start-up recovery only, with the host-wide TPM lock held: without a
        resource manager a tpmid process killed mid-command leaves its loaded
        object in one of the TPM's few slots (3 on swtpm) until power-off. Under
        a resource manager (``/dev/tpmrm0``, tabrmd) a new connection sees none.
        """
        flushed: list[int] = []
        for handle in self.transient_handles():
            with self.lock, tpm_call(f"flushing stale transient object {handle:#x}", self):
                tr = self.esapi.tr_from_tpmpublic(handle)
                self.esapi.flush_context(tr)
            flushed.append(handle)
        return flushed

    def persistent_handles(self) -> list[int]:
        """Handles of all persistent objects (0x81xxxxxx)."""
        return self.handles(PERSISTENT_FIRST)

    def nv_indices(self) -> list[int]:
        """All defined NV indices (0x01xxxxxx)."""
        return self.handles(NV_INDEX_FIRST)


# ---------------------------------------------------------------------- error mapping


def _unreachable(tcti: str, exc: BaseException) -> TpmError:
    rc = getattr(exc, "rc", None)
    module = tcti.split(":", 1)[0] or tcti
    if rc is not None and (rc & 0xFF0000) == LAYER_TCTI and (rc & 0xFFFF) == BASE_RC_NOT_SUPPORTED:
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
    return TpmError(
        f"TPM not reachable through TCTI {tcti!r}: {_tss_text(exc)}", rc=rc, hint=hint
    )


def _subject(handles: Sequence[str], n: int, kind: str) -> str:
    if 1 <= n <= len(handles):
        return handles[n - 1]
    return f"{kind} {n}" if n else "the object"


def _lockout_details(tpm: TpmConnection | None) -> tuple[str, str]:
    if tpm is None:
        return "", "wait for the TPM's lockout interval or reset the lockout"
    try:
        p = tpm.properties(PT_LOCKOUT_COUNTER, 4)
    except TpmError:
        return "", "wait for the TPM's lockout interval or reset the lockout"
    counter = p.get(PT_LOCKOUT_COUNTER, 0)
    max_tries = p.get(PT_MAX_AUTH_FAIL, 0)
    interval = p.get(PT_LOCKOUT_INTERVAL, 0)
    recovery = p.get(PT_LOCKOUT_RECOVERY, 0)
    detail = (f" ({counter} failed authorizations, {max_tries} allowed; one is forgiven every "
              f"{interval} s)")
    # TPM 2.0 Part 1, dictionary-attack protection: while failedTries >= maxTries every DA-protected use
    # fails until recoveryTime has decremented the counter once.
    hint = (f"wait up to {interval} s for the TPM to forgive one failure, or reset it now with "
            "the lockout password (tpm2_dictionarylockout --clear-lockout); if the lockout "
            f"password itself was wrong, that is blocked for {recovery} s")
    return detail, hint


def describe_error(what: str, exc: BaseException, tpm: TpmConnection | None = None,
                   handles: Sequence[str] = ()) -> TpmError:
    """Turn a TSS2 exception into a :class:`TpmError` whose message says what to do.

    ``handles`` names the command's handles in order ("the owner hierarchy",
    "key at 0x81020000"); session N is taken to authorize handle N, which holds for
    the commands tpmid sends.
    """
    rc = getattr(exc, "rc", None)
    if rc is None:
        return TpmError(f"TPM error while {what}: {_tss_text(exc)}")
    d = decode_rc(int(rc))
    tcti = tpm.tcti if tpm is not None else "the TPM"
    if d.layer == LAYER_TCTI:
        return TpmError(
            f"TPM not reachable through TCTI {tcti!r} while {what}: {_tss_text(exc)}",
            rc=rc, hint="check that the TPM or simulator is still running",
        )
    if not d.from_tpm:
        return TpmError(f"TPM software stack error while {what}: {_tss_text(exc)} "
                        f"(rc {rc:#x})", rc=rc)
    code = d.code
    if code == RC_LOCKOUT:
        detail, hint = _lockout_details(tpm)
        return TpmError(f"the TPM is in dictionary-attack lockout while {what}{detail}",
                        rc=rc, hint=hint)
    if code in (RC_AUTH_FAIL, RC_BAD_AUTH):
        subject = _subject(handles, d.session or d.handle, "session")
        hint = f"check the password of {subject}"
        if "hierarchy" in subject:
            name = subject.split()[1] if subject.startswith("the ") else subject.split()[0]
            hint = f"check tpm.auth.{name} in the config (the {name} hierarchy's password)"
        msg = f"authorization failed for {subject} while {what}"
        if code == RC_AUTH_FAIL:
            msg += "; the TPM counted this failure towards its dictionary-attack lockout"
        return TpmError(msg, rc=rc, hint=hint)
    if code in (RC_OBJECT_MEMORY, RC_OBJECT_HANDLES):
        slots = 3
        if tpm is not None:
            try:
                slots = tpm.properties(PT_HR_TRANSIENT_MIN, 1).get(PT_HR_TRANSIENT_MIN, 3)
            except TpmError:
                pass
        return TpmError(
            f"TPM object memory is full while {what}: the TPM guarantees only {slots} transient "
            "slots; is another process using the TPM without a resource manager?",
            rc=rc,
            hint="use device:/dev/tpmrm0 or tpm2-abrmd, or flush leftovers with "
            "`tpm2_flushcontext -t` when nothing else uses the TPM",
        )
    if code == RC_HANDLE:
        subject = _subject(handles, d.handle, "handle")
        return TpmError(f"{subject} does not exist in the TPM (while {what})", rc=rc)
    if code in UNSUPPORTED_RCS:
        return TpmError(
            f"this TPM does not support the {UNSUPPORTED_RCS[code]} requested while {what}",
            rc=rc, hint="see `tpmid tpm info` for the algorithms and curves it implements",
        )
    if code == RC_INITIALIZE:
        return TpmError(f"the TPM has not been started (TPM2_Startup) while {what}", rc=rc,
                        hint="reconnect: tpmid sends TPM2_Startup when it connects")
    if code == RC_FAILURE:
        return TpmError(f"the TPM is in failure mode while {what}", rc=rc,
                        hint="a TPM reset (reboot) is needed; see `tpm2_gettestresult`")
    if code == RC_HIERARCHY:
        return TpmError(f"the hierarchy needed for {what} is disabled", rc=rc,
                        hint="enable it in firmware or with tpm2_hierarchycontrol")
    if code == RC_NV_RATE:
        return TpmError(f"the TPM is rate-limiting NV writes while {what}", rc=rc,
                        hint="retry in a few seconds")
    return TpmError(f"the TPM refused a command while {what}: {_tss_text(exc)} (rc {rc:#x})",
                    rc=rc)


@contextlib.contextmanager
def tpm_call(what: str, tpm: TpmConnection | None = None, *,
             handles: Sequence[str] = ()) -> Iterator[None]:
    """Map a ``TSS2_Exception`` raised inside the block to :class:`TpmError` (``raise from``).

    ``what`` completes "... while <what>"; pass ``tpm`` so that lockout and memory
    errors can include the TPM's own numbers, and ``handles`` to name the
    hierarchy or object an authorization failure is about.
    """
    from tpm2_pytss import TSS2_Exception

    try:
        yield
    except TSS2_Exception as e:
        raise describe_error(what, e, tpm, handles) from e
