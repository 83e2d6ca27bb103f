"""Credential resolution: a typed code or a scanned token to the decision the bank takes."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from datetime import datetime

from lockerd.core.access import (
    CompartmentView,
    Reason,
    Refused,
    evaluate_code,
    pickup_target,
)
from lockerd.core.bank import CredentialDecision, OpenPickup, StartSession
from lockerd.core.credential import Access
from lockerd.core.deposit import SessionCredential
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.store.codes import DERIVED_PREFIX, CodeStore
from lockerd.store.parcels import SpentTokens
from lockerd.trust.digest import code_digest, derived_pickup_code, support_code, support_window
from lockerd.trust.keyring import Keyring
from lockerd.trust.qrtoken import QrToken, check_qr_token, decode_qr_token

log = get_logger("lockerd.credentials")

_TOKEN_REASONS = {r.value: r for r in Reason}


class CredentialService:
    """Reads only: the code store (digest lookup, revoked derived codes), the spent tokens
    and the keyring. Nothing is changed here; a use is taken by the event that reports it."""

    def __init__(
        self,
        *,
        locker_id: str,
        codes: CodeStore,
        code_key: bytes,
        tokens: SpentTokens,
        keyring: Callable[[], Keyring | None] = lambda: None,
        support_digits: int | None = None,
    ) -> None:
        self._locker_id = locker_id
        self.support_digits = support_digits  # None: support codes are not accepted
        # The support codes of the accepted windows, kept (see _support_index).
        self._support_codes: dict[tuple[str, int, int], str] = {}
        self._support_index_map: dict[str, tuple[str, int]] = {}
        self._support_key: tuple[tuple[str, ...], int, int] | None = None
        self._codes = codes
        self._code_key = code_key
        self._tokens = tokens
        self._keyring = keyring
        # (code, its digest) of the code being typed, made between two keys (`prepare`).
        self._prepared: tuple[str, str] | None = None

    @property
    def prepared(self) -> str | None:
        """The code whose digest `prepare` made, until a code is submitted; else None."""
        return None if self._prepared is None else self._prepared[0]

    def prepare(self, code: str) -> None:
        """Make the digest of `code` now, while the customer types, so that `code` does not
        make it once `#` is pressed. The digest depends on the code and this service's key
        alone, never on what the store holds, so it is never stale; it is forgotten once the
        code is submitted, so that the digits do not stay in memory. (It is the first HMAC
        after the keypad was idle that costs: 45-55 us on the bench's machine, against 2-4
        us for the next one.)"""
        self._prepared = (code, code_digest(self._code_key, self._locker_id, code))

    def forget(self) -> None:
        """Drop the prepared digest and its code (nothing is being typed any more)."""
        self._prepared = None

    def _digest(self, code: str) -> str:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == code:
            return prepared[1]
        return code_digest(self._code_key, self._locker_id, code)

    def code(self, code: str, *, source: str, views: Mapping[str, CompartmentView],
             now: datetime, derived_digits: int | None) -> CredentialDecision:
        """A code typed on the keypad or scanned as digits."""
        record = self._codes.lookup(self._digest(code))
        decision = evaluate_code(record, now=now, compartments=views)
        if record is None and derived_digits is not None:
            derived = self._derived(code, views, derived_digits, source)
            if derived is not None:
                return derived
        if record is None and self.support_digits is not None:
            support = self._support(code, views, now, self.support_digits, source)
            if support is not None:
                return support
        if isinstance(decision, Refused):
            return decision
        if decision.kind == "pickup":
            assert decision.compartment is not None
            return OpenPickup(decision.compartment, Access(
                code_id=decision.code_id, digest=decision.digest, kind=decision.kind,
                source=source, parcel_id=decision.parcel_id))
        assert decision.code_id is not None
        return StartSession(SessionCredential(
            kind=decision.kind, source=source, code_id=decision.code_id, digest=decision.digest,
            parcel_id=decision.parcel_id, compartment=decision.compartment))

    def _derived(self, code: str, views: Mapping[str, CompartmentView], digits: int,
                 source: str) -> Refused | OpenPickup | None:
        """A derived pickup code (PROTOCOL section 4) of a parcel that lies here, if `code` is
        one. Only parcels on record can match, so the cost is one HMAC per occupied door."""
        if len(code) != digits:
            return None
        for cid, view in views.items():
            parcel_id = view.parcel_id
            if parcel_id is None:
                continue
            expected = derived_pickup_code(self._code_key, self._locker_id, parcel_id, digits)
            if not hmac.compare_digest(expected, code):
                continue
            code_id = DERIVED_PREFIX + parcel_id
            if self._codes.derived_revoked(parcel_id):
                return Refused(Reason.REVOKED, code_id=code_id, compartment=cid)
            target = pickup_target(code_id, compartment=cid, parcel_id=parcel_id,
                                   compartments=views)
            if isinstance(target, Refused):
                return target
            assert target.compartment is not None
            return OpenPickup(target.compartment, Access(
                code_id=code_id, digest=None, kind="pickup", source=source, parcel_id=parcel_id))
        return None

    def _support(self, code: str, views: Mapping[str, CompartmentView], now: datetime,
                 digits: int, source: str) -> Refused | OpenPickup | None:
        """A support code (PROTOCOL section 13) of a parcel that lies here, for the trusted
        time's window, the one before or the one after: three codes per candidate parcel."""
        if len(code) != digits:
            return None
        on_record = {v.parcel_id for v in views.values() if v.parcel_id is not None}
        candidates = (*sorted(on_record), *self._codes.parcels_with_pickup_codes())
        index = self._support_index(candidates, support_window(now.timestamp()), digits)
        # A dict look-up of the typed code: str hashes are keyed per process, so its timing
        # says nothing about which codes are valid (as compare_digest ensures elsewhere).
        match = index.get(code)
        if match is None:
            return None
        return self._use_support(*match, views, source, on_record=match[0] in on_record)

    def _support_index(self, candidates: tuple[str, ...], current: int,
                       digits: int) -> dict[str, tuple[str, int]]:
        """code -> (parcel_id, window) of every candidate and accepted window. Rebuilt only
        when the window or the candidates change (a deposit, a pickup, a bundle): a keypress
        then costs one look-up, and a new window three HMACs per parcel."""
        key = (candidates, current, digits)
        if self._support_key != key:
            kept = {k: v for k, v in self._support_codes.items()
                    if current - 1 <= k[1] <= current + 1 and k[2] == digits}
            index: dict[str, tuple[str, int]] = {}
            for parcel_id in candidates:
                for window in (current - 1, current, current + 1):
                    expected = kept.get((parcel_id, window, digits))
                    if expected is None:
                        expected = support_code(self._code_key, self._locker_id, parcel_id,
                                                window, digits)
                        kept[(parcel_id, window, digits)] = expected
                    index.setdefault(expected, (parcel_id, window))
            self._support_codes, self._support_index_map, self._support_key = kept, index, key
        return self._support_index_map

    def _use_support(self, parcel_id: str, window: int, views: Mapping[str, CompartmentView],
                     source: str, *, on_record: bool) -> Refused | OpenPickup | None:
        """Open the parcel's door as its own pickup code would, taking that code's use if
        there is one; the (parcel, window) mark is set when the door is seen open. None:
        the parcel does not lie here after all (its code was used up or revoked meanwhile)."""
        # The parcel is named in every event: the door may open for it with no code id.
        ref = {"via": "support", "window": str(window), "parcel_id": parcel_id}
        record = self._codes.parcel_pickup_code(parcel_id)
        if record is None and not on_record:
            return None
        code_id = record.id if record is not None else None
        if self._codes.derived_revoked(parcel_id):
            return Refused(Reason.REVOKED, code_id=DERIVED_PREFIX + parcel_id, ref=ref)
        if self._codes.support_used(parcel_id, window):
            return Refused(Reason.USED, code_id=code_id, ref=ref)
        digest = record.digest if record is not None else None
        target = pickup_target(code_id, compartment=record.compartment if record else None,
                               parcel_id=parcel_id, compartments=views, digest=digest, ref=ref)
        if isinstance(target, Refused):
            return target
        assert target.compartment is not None
        return OpenPickup(target.compartment, Access(
            code_id=code_id, digest=digest, kind="pickup", source=source, ref=ref,
            parcel_id=parcel_id, support_window=window))

    def token(self, text: str, *, source: str, views: Mapping[str, CompartmentView],
              now: datetime) -> CredentialDecision:
        """A scanned QR token (PROTOCOL section 9): verified offline, then used like a code."""
        keyring = self._keyring()
        if keyring is None:
            return Refused(Reason.NO_KEYRING)
        ref: dict[str, str] = {}
        try:
            token = decode_qr_token(text, qr_role=keyring.qr)
            # Signed by a qr key from here on: a refusal names the token, so the backend can
            # tell whose it was. A forged or broken token's claimed cti is never reported.
            ref = {"cti": token.cti_hex}
            check_qr_token(token, keyring_expires_at=keyring.expires_at,
                           locker_id=self._locker_id, now=now)
        except TrustError as exc:
            log.info("QR token refused", reason=exc.reason, error=str(exc))
            return Refused(_TOKEN_REASONS.get(exc.reason, Reason.MALFORMED), ref=ref)
        return self._use_token(token, source=source, views=views)

    def _use_token(self, token: QrToken, *, source: str,
                   views: Mapping[str, CompartmentView]) -> CredentialDecision:
        ref = {"cti": token.cti_hex}
        if self._tokens.is_spent(token.cti_hex):
            return Refused(Reason.USED, compartment=token.compartment, ref=ref)
        expires = int(token.expires_at.timestamp())
        if token.kind != "pickup":
            return StartSession(SessionCredential(
                kind=token.kind, source=source, cti=token.cti_hex, cti_expires=expires,
                parcel_id=token.parcel_id, compartment=token.compartment))
        decision = pickup_target(None, compartment=token.compartment, parcel_id=token.parcel_id,
                                 compartments=views, ref=ref)
        if isinstance(decision, Refused):
            return decision
        assert decision.compartment is not None
        return OpenPickup(decision.compartment, Access(
            code_id=None, digest=None, kind="pickup", source=source, ref=ref,
            parcel_id=decision.parcel_id, cti=token.cti_hex, cti_expires=expires))
