"""TSS2 return codes as :class:`~tpmid.errors.TpmError` messages a person can act on.

:func:`tpm_call` is the one place where a ``TSS2_Exception`` becomes a
``TpmError``. The codes come from tpm2-pytss (``TPM2_RC``, ``TSS2_RC``) and the
handle / parameter / session number from the exception itself (TPM 2.0 Part 2
§6.6: format-one codes carry the number in bits 8-11). What each code means for
an operator is a table (:data:`_SIMPLE`, :data:`_UNSUPPORTED`, :data:`_SPECIAL`),
read top to bottom by :func:`describe_error`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RC, TSS2_RC

from tpmid.errors import TpmError

# TSS2 layers (tss2_common.h): who answered, in bits 16-23 of a TSS2_RC.
LAYER_MASK = int(TSS2_RC.RC_LAYER_MASK)
TPM_LAYERS = (int(TSS2_RC.TPM_RC_LAYER), int(TSS2_RC.RESMGR_TPM_RC_LAYER))
TCTI_LAYER = int(TSS2_RC.TCTI_RC_LAYER)

# TPM 2.0 Part 2 §6.13 (TPM_PT): the lockout counters, read for a lockout message.
PT_HR_TRANSIENT_MIN = 0x10E
PT_LOCKOUT_COUNTER = 0x20E
PT_MAX_AUTH_FAIL = 0x20F
PT_LOCKOUT_INTERVAL = 0x210
PT_LOCKOUT_RECOVERY = 0x211


class TpmLike(Protocol):
    """What error descriptions read from the TPM connection (its numbers, its TCTI)."""

    tcti: str

    def properties(self, first: int, count: int) -> dict[int, int]:
        """TPM_PT properties ``first`` .. ``first+count-1``."""
        ...


@dataclass(frozen=True)
class Failure:
    """One failed command, taken apart: what tpmid was doing and what the TPM said."""

    what: str  # completes "... while <what>"
    exc: BaseException
    rc: int
    code: int  # the TPM_RC without handle/parameter/session number
    handle: int  # 1-based numbers, 0 if the code is not about one
    session: int
    tpm: TpmLike | None
    handles: Sequence[str]  # names of the command's handles, in order

    @property
    def text(self) -> str:
        """What the TSS said, for the message (never a secret: codes and names only)."""
        return str(self.exc).strip() or type(self.exc).__name__

    def subject(self, number: int, kind: str) -> str:
        """The name of handle (or session) ``number``; session N authorizes handle N."""
        if 1 <= number <= len(self.handles):
            return self.handles[number - 1]
        return f"{kind} {number}" if number else "the object"


def _lockout(f: Failure) -> TpmError:
    detail = ""
    hint = "wait for the TPM's lockout interval or reset the lockout"
    if f.tpm is not None:
        try:
            p = f.tpm.properties(PT_LOCKOUT_COUNTER, 4)
        except TpmError:
            p = {}
        if p:
            interval = p.get(PT_LOCKOUT_INTERVAL, 0)
            detail = (f" ({p.get(PT_LOCKOUT_COUNTER, 0)} failed authorizations, "
                      f"{p.get(PT_MAX_AUTH_FAIL, 0)} allowed; one is forgiven every {interval} s)")
            # TPM 2.0 Part 1, dictionary-attack protection: while failedTries >= maxTries
            # every DA-protected use fails until recoveryTime has decremented the counter.
            hint = (f"wait up to {interval} s for the TPM to forgive one failure, or reset it "
                    "now with the lockout password (tpm2_dictionarylockout --clear-lockout); if "
                    "the lockout password itself was wrong, that is blocked for "
                    f"{p.get(PT_LOCKOUT_RECOVERY, 0)} s")
    return TpmError(f"the TPM is in dictionary-attack lockout while {f.what}{detail}",
                    rc=f.rc, hint=hint)


def _auth(f: Failure) -> TpmError:
    subject = f.subject(f.session or f.handle, "session")
    hint = f"check the password of {subject}"
    if "hierarchy" in subject:
        name = subject.split()[1] if subject.startswith("the ") else subject.split()[0]
        hint = f"check tpm.auth.{name} in the config (the {name} hierarchy's password)"
    msg = f"authorization failed for {subject} while {f.what}"
    if f.code == int(TPM2_RC.AUTH_FAIL):
        msg += "; the TPM counted this failure towards its dictionary-attack lockout"
    return TpmError(msg, rc=f.rc, hint=hint)


def _memory(f: Failure) -> TpmError:
    slots = 3
    if f.tpm is not None:
        with contextlib.suppress(TpmError):
            slots = f.tpm.properties(PT_HR_TRANSIENT_MIN, 1).get(PT_HR_TRANSIENT_MIN, 3)
    return TpmError(
        f"TPM object memory is full while {f.what}: the TPM guarantees only {slots} transient "
        "slots; is another process using the TPM without a resource manager?",
        rc=f.rc,
        hint="use device:/dev/tpmrm0 or tpm2-abrmd; `tpmid check` flushes objects that "
        "tpmid processes which are gone left behind",
    )


def _handle(f: Failure) -> TpmError:
    return TpmError(f"{f.subject(f.handle, 'handle')} does not exist in the TPM (while {f.what})",
                    rc=f.rc)


# Codes whose explanation needs the failure's details or the TPM's numbers.
_SPECIAL: dict[int, Callable[[Failure], TpmError]] = {
    int(TPM2_RC.LOCKOUT): _lockout,
    int(TPM2_RC.AUTH_FAIL): _auth,
    int(TPM2_RC.BAD_AUTH): _auth,
    int(TPM2_RC.OBJECT_MEMORY): _memory,
    int(TPM2_RC.OBJECT_HANDLES): _memory,
    int(TPM2_RC.HANDLE): _handle,
}

# Codes with a fixed explanation: (message with {what}, hint).
_SIMPLE: dict[int, tuple[str, str | None]] = {
    int(TPM2_RC.INITIALIZE): ("the TPM has not been started (TPM2_Startup) while {what}",
                              "reconnect: tpmid sends TPM2_Startup when it connects"),
    int(TPM2_RC.FAILURE): ("the TPM is in failure mode while {what}",
                           "a TPM reset (reboot) is needed; see `tpm2_gettestresult`"),
    int(TPM2_RC.HIERARCHY): ("the hierarchy needed for {what} is disabled",
                             "enable it in firmware or with tpm2_hierarchycontrol"),
    int(TPM2_RC.NV_RATE): ("the TPM is rate-limiting NV writes while {what}",
                           "retry in a few seconds"),
    int(TPM2_RC.COMMAND_CODE): ("this TPM does not implement the command needed for {what}",
                                None),
}

# Algorithm-support failures: the TPM does not implement what a template asks for.
_UNSUPPORTED: dict[int, str] = {
    int(TPM2_RC.ASYMMETRIC): "asymmetric algorithm",
    int(TPM2_RC.HASH): "hash algorithm",
    int(TPM2_RC.KEY_SIZE): "key size",
    int(TPM2_RC.KDF): "key derivation function",
    int(TPM2_RC.SCHEME): "signing scheme",
    int(TPM2_RC.SYMMETRIC): "symmetric algorithm",
    int(TPM2_RC.MODE): "symmetric mode",
    int(TPM2_RC.CURVE): "ECC curve",
}
UNSUPPORTED_CODES = frozenset(_UNSUPPORTED)


def tpm_code(e: BaseException | None) -> int | None:
    """The TPM_RC of ``e`` without layer and numbers, None if the TPM did not answer."""
    rc = getattr(e, "rc", None)
    if rc is None or int(rc) & LAYER_MASK not in TPM_LAYERS:
        return None
    rc = int(rc)
    if rc & int(TPM2_RC.FMT1):
        return int(TPM2_RC.FMT1) | (rc & 0x3F)
    return rc & 0xFFFF


def is_code(e: BaseException | None, code: TPM2_RC) -> bool:
    """True when ``e`` (a TpmError or TSS2_Exception) carries TPM return code ``code``."""
    return tpm_code(e) == int(code)


def describe_error(what: str, exc: BaseException, tpm: TpmLike | None = None,
                   handles: Sequence[str] = ()) -> TpmError:
    """Turn a TSS2 exception into a :class:`TpmError` whose message says what to do.

    ``handles`` names the command's handles in order ("the owner hierarchy",
    "key at 0x81020000"); session N is taken to authorize handle N, which holds for
    the commands tpmid sends.
    """
    rc = getattr(exc, "rc", None)
    text = str(exc).strip() or type(exc).__name__
    if rc is None:
        return TpmError(f"TPM error while {what}: {text}")
    rc = int(rc)
    tcti = tpm.tcti if tpm is not None else "the TPM"
    if rc & LAYER_MASK == TCTI_LAYER:
        return TpmError(f"TPM not reachable through TCTI {tcti!r} while {what}: {text}",
                        rc=rc, hint="check that the TPM or simulator is still running")
    code = tpm_code(exc)
    if code is None:
        return TpmError(f"TPM software stack error while {what}: {text} (rc {rc:#x})", rc=rc)
    f = Failure(what=what, exc=exc, rc=rc, code=code,
                handle=int(getattr(exc, "handle", 0) or 0),
                session=int(getattr(exc, "session", 0) or 0), tpm=tpm, handles=handles)
    if code in _SPECIAL:
        return _SPECIAL[code](f)
    if code in _SIMPLE:
        message, hint = _SIMPLE[code]
        return TpmError(message.format(what=what), rc=rc, hint=hint)
    if code in _UNSUPPORTED:
        return TpmError(
            f"this TPM does not support the {_UNSUPPORTED[code]} requested while {what}",
            rc=rc, hint="see `tpmid tpm info` for the algorithms and curves it implements",
        )
    return TpmError(f"the TPM refused a command while {what}: {text} (rc {rc:#x})", rc=rc)


@contextlib.contextmanager
def tpm_call(what: str, tpm: TpmLike | None = None, *,
             handles: Sequence[str] = ()) -> Iterator[None]:
    """Map a ``TSS2_Exception`` raised inside the block to :class:`TpmError` (``raise from``).

    ``what`` completes "... while <what>"; pass ``tpm`` so that lockout and memory
    errors can include the TPM's own numbers, and ``handles`` to name the
    hierarchy or object an authorization failure is about.
    """
    try:
        yield
    except TSS2_Exception as e:
        # tpmid's own TCTI knows why the connection failed (no answer in time, lost,
        # a stop request); tpm2-tss only saw a generic TCTI failure.
        transport = getattr(tpm, "transport_error", None)
        failure = transport() if callable(transport) else None
        if isinstance(failure, TpmError):
            raise TpmError(f"{failure.message} (while {what})", rc=int(e.rc),
                           hint=failure.hint) from e
        if failure is not None:
            raise failure from e
        raise describe_error(what, e, tpm, handles) from e
