"""Who a secure-aggregation peer is: the consortium roster and signed setup keys.

A hospital accepts a peer's round keys only when they are signed by a node key on the
consortium's *roster*: the list of enrolled hospitals (name and node-authentication public key),
signed by the consortium CA. The roster reaches the hospital with ``ca.pem`` when it joins (a
file in its site folder), never from the coordinator at run time, so a coordinator that invents
hospitals cannot make them count: it holds no enrolled node key and cannot re-sign the roster
without the CA's private key (kept offline once hospitals are enrolled).

Every roster carries, under the CA's signature, a *serial* (one more at each re-signing) and an
*expiry*. A hospital refuses an expired roster, and remembers the newest serial it has accepted
(:mod:`privacy.secagg.roster_state`), refusing any older one: a roster that still lists a
revoked (e.g. stolen) key cannot be replayed once the hospital has seen the newer one, and
stops counting at its expiry even at a hospital that never got the newer one.

Everything here is ``cryptography``: ECDSA over the curve of each key (P-384, as Flower makes node
keys) with SHA-384; the signed bytes are canonical JSON, so the check does not depend on how a
TOML writer lays a file out.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.pki import public_key_fingerprint
from privacy.secagg.config import SecAggError

ROSTER_FILE = "roster.toml"
"""The roster's file name in the consortium folder and in each hospital's site folder."""
NODE_KEY = "node-key"
"""Node-config key: the hospital's node-authentication private key (OpenSSH, as Flower's)."""
ROSTER_KEY = "secagg-roster"
"""Node-config key: the CA-signed roster."""
CA_KEY = "ca-cert"
"""Node-config key: the consortium CA certificate that signed the roster."""
_SETUP_CONTEXT = "medfed secagg setup keys v1"
ROSTER_STATE_KEY = "secagg-roster-state"
"""Node-config key: the file where the hospital keeps the newest roster serial it accepted."""
DEFAULT_ROSTER_VALID_DAYS = 30.0
"""How long a newly signed roster is valid unless the coordinator's config says otherwise."""
RESIGN_HINT = ("the coordinator re-signs it with 'medfed coordinator sign-roster DIR "
               "--ca-key PATH' where the CA key is, and sends the new roster.toml to every "
               "hospital")
_ROSTER_CONTEXT = "medfed consortium roster v2"
_SURVIVORS_CONTEXT = "medfed secagg survivors v1"


@dataclass(frozen=True)
class Roster:
    """The consortium's enrolled hospitals, as the CA signed them.

    Attributes:
        consortium: the consortium's name.
        issued_at: when the CA signed this list (ISO 8601 UTC).
        keys: hospital name -> its node-authentication public key.
        serial: the roster's number, one more at each re-signing (signed).
        expires_at: after this time (ISO 8601 UTC, signed) no hospital accepts it.
        digest: SHA-256 (hex) of the signed body: two rosters under one serial differ here.
    """

    consortium: str
    issued_at: str
    keys: dict[str, ec.EllipticCurvePublicKey]
    serial: int
    expires_at: str
    digest: str

    def expired(self, now: dt.datetime | None = None) -> bool:
        """Whether the roster's expiry has passed at ``now`` (default: the clock, UTC)."""
        return (now or dt.datetime.now(dt.UTC)) >= dt.datetime.fromisoformat(self.expires_at)

    def name_of(self, key: ec.EllipticCurvePublicKey) -> str | None:
        """The enrolled name of ``key`` (``None``: not on the roster)."""
        wanted = public_key_fingerprint(key)
        for name, enrolled in self.keys.items():
            if public_key_fingerprint(enrolled) == wanted:
                return name
        return None


@dataclass(frozen=True)
class SecAggIdentity:
    """What a hospital signs with and checks peers against in secure aggregation.

    Attributes:
        name: the hospital's enrolled name (found on the roster by its key).
        key: its node-authentication private key.
        roster: the consortium's roster, already checked against the CA.
    """

    name: str
    key: ec.EllipticCurvePrivateKey
    roster: Roster


IdentityLoader = Callable[[object], SecAggIdentity]
"""A hospital's identity from its Flower ``Context`` (raises ``SecAggError`` if it has none)."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _roster_body(consortium: str, issued_at: str, serial: int, expires_at: str,
                 hospitals: list[dict[str, str]]) -> bytes:
    return _canonical({"context": _ROSTER_CONTEXT, "consortium": consortium,
                       "issued_at": issued_at, "serial": int(serial), "expires_at": expires_at,
                       "hospital": hospitals})


def write_roster(path: Path, ca_key: ec.EllipticCurvePrivateKey, consortium: str,
                 hospitals: dict[str, str], serial: int = 1,
                 valid_days: float = DEFAULT_ROSTER_VALID_DAYS) -> None:
    """Sign and write the roster: ``hospitals`` maps each active hospital's name to its OpenSSH
    public key line. Written to a temporary file and renamed (never half a roster)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(roster_text(ca_key, consortium, hospitals, serial, valid_days))
    tmp.replace(path)


def roster_text(ca_key: ec.EllipticCurvePrivateKey, consortium: str,
                hospitals: dict[str, str], serial: int = 1,
                valid_days: float = DEFAULT_ROSTER_VALID_DAYS,
                now: dt.datetime | None = None) -> str:
    """The signed roster file's text (see :func:`write_roster`): serial ``serial`` (>= 1),
    valid for ``valid_days`` from ``now`` (default: the clock)."""
    if isinstance(serial, bool) or int(serial) < 1 or not valid_days > 0:
        raise SecAggError(f"roster serial {serial} must be >= 1 and validity {valid_days} "
                          "days > 0")
    entries = []
    for name, line in sorted(hospitals.items()):
        key = serialization.load_ssh_public_key(line.encode())
        entries.append({"name": name, "public_key": line.strip(),
                        "fingerprint": public_key_fingerprint(key)})
    issued = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    issued_at = issued.isoformat()
    expires_at = (issued + dt.timedelta(days=valid_days)).isoformat(timespec="seconds")
    signature = ca_key.sign(_roster_body(consortium, issued_at, serial, expires_at, entries),
                            ec.ECDSA(hashes.SHA384()))
    return ("# The consortium's enrolled hospitals, signed by its CA (medfed). Give it to every\n"
            "# hospital with ca.pem; a hospital counts a secure-aggregation peer only if it is\n"
            "# on this list. Any edit breaks the signature. A hospital refuses it after\n"
            "# expires_at, and once it has accepted a roster with a higher serial.\n"
            ) + tomli_w.dumps({
                "consortium": consortium, "issued_at": issued_at, "serial": int(serial),
                "expires_at": expires_at, "signature": base64.b64encode(signature).decode(),
                "hospital": entries})


def load_roster(path: Path, ca_cert: Path, now: dt.datetime | None = None) -> Roster:
    """Read the roster, check the CA's signature on it and that it has not expired.

    Raises:
        SecAggError: the file or certificate is unreadable, the signature does not verify
            against ``ca_cert``, an entry is malformed (its fingerprint does not match its
            key, a name or key twice), it has no serial (an old roster) or it expired.
    """
    try:
        text, ca_pem = Path(path).read_text(), Path(ca_cert).read_bytes()
    except OSError as err:
        raise SecAggError(f"consortium roster {path} or CA certificate {ca_cert}: cannot read "
                          f"it ({err}); copy both from the consortium") from err
    where = f"consortium roster {path}"
    return check_unexpired(parse_roster(text, ca_pem, where), where, now)


def check_unexpired(roster: Roster, where: str, now: dt.datetime | None = None) -> Roster:
    """``roster`` if it has not expired at ``now``.

    Raises:
        SecAggError: it expired (naming when, its serial, and what the operator does).
    """
    if roster.expired(now):
        raise SecAggError(f"{where}: serial {roster.serial} expired at {roster.expires_at}; "
                          f"an expired roster is refused (it may still list revoked keys): "
                          f"{RESIGN_HINT}")
    return roster


def _serial_and_expiry(data: dict, where: str) -> tuple[int, str]:
    """The roster's serial and expiry as written (not yet checked against the signature)."""
    if "serial" not in data or "expires_at" not in data:
        raise SecAggError(f"{where}: has no serial or expiry (signed by a medfed from before "
                          f"roster freshness); it is refused: {RESIGN_HINT}")
    serial, expires_at = data["serial"], data["expires_at"]
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 1:
        raise SecAggError(f"{where}: serial = {serial!r}: must be an integer >= 1")
    try:
        expiry = dt.datetime.fromisoformat(str(expires_at))
    except ValueError as err:
        raise SecAggError(f"{where}: expires_at = {expires_at!r}: not an ISO 8601 time") from err
    if expiry.tzinfo is None:
        raise SecAggError(f"{where}: expires_at = {expires_at!r}: needs a UTC offset")
    return serial, str(expires_at)


def parse_roster(text: str, ca_pem: bytes, where: str = "consortium roster") -> Roster:
    """:func:`load_roster` on the file's text and the CA certificate's PEM bytes."""
    try:
        data = tomllib.loads(text)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise SecAggError(f"{where}: cannot parse it or the CA certificate ({err})") from err
    serial, expires_at = _serial_and_expiry(data, where)
    try:
        consortium, issued_at = str(data["consortium"]), str(data["issued_at"])
        signature = base64.b64decode(str(data["signature"]), validate=True)
        entries = [{"name": str(e["name"]), "public_key": str(e["public_key"]),
                    "fingerprint": str(e["fingerprint"])} for e in data.get("hospital", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise SecAggError(f"{where}: malformed ({err})") from err
    ca_public = ca.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise SecAggError(f"{where}: the CA certificate holds no EC key")
    body = _roster_body(consortium, issued_at, serial, expires_at, entries)
    try:
        ca_public.verify(signature, body, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as err:
        raise SecAggError(f"{where}: not signed by the consortium CA (edited, or from another "
                          "consortium); ask the coordinator for the current one") from err
    keys = _roster_keys(entries, where)
    return Roster(consortium, issued_at, keys, serial, expires_at,
                  hashlib.sha256(body).hexdigest())


def _roster_keys(entries: list[dict[str, str]], where: str) -> dict[str, ec.EllipticCurvePublicKey]:
    """Hospital name -> public key of a verified roster's entries, each checked."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        try:
            key = serialization.load_ssh_public_key(entry["public_key"].encode())
        except (ValueError, UnsupportedAlgorithm) as err:
            raise SecAggError(f"{where}: hospital '{entry['name']}' has no readable key") from err
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise SecAggError(f"{where}: hospital '{entry['name']}' has no EC key")
        if public_key_fingerprint(key) != entry["fingerprint"] or entry["name"] in keys:
            raise SecAggError(f"{where}: hospital '{entry['name']}' is listed twice or its key "
                              "does not match its fingerprint")
        keys[entry["name"]] = key
    if len({public_key_fingerprint(k) for k in keys.values()}) != len(keys):
        raise SecAggError(f"{where}: one key is enrolled under two names")
    return keys


def identity_from_node_config(context) -> SecAggIdentity:
    """The hospital daemon's identity: ``node-key``, ``secagg-roster``, ``ca-cert`` and
    ``secagg-roster-state`` in its node config (``medfed hospital start`` sets them from the
    site folder). The roster must verify, be unexpired and not older than the newest this
    hospital accepted (:func:`privacy.secagg.roster_state.accept_roster`, which records a
    newer one).

    Raises:
        SecAggError: a path is unset or unreadable, the roster does not verify, expired or is
            older than one accepted before, or this hospital's own key is not on it.
    """
    from privacy.secagg.roster_state import accept_roster

    config = context.node_config
    missing = [k for k in (NODE_KEY, ROSTER_KEY, CA_KEY, ROSTER_STATE_KEY) if not config.get(k)]
    if missing:
        raise SecAggError(f"this hospital cannot take part in secure aggregation: node config "
                          f"lacks {missing} (the site folder's node.key, {ROSTER_FILE}, ca.pem "
                          f"and roster state; 'medfed hospital start' sets them)")
    try:
        key = serialization.load_ssh_private_key(Path(str(config[NODE_KEY])).read_bytes(),
                                                 password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise SecAggError(f"node key {config[NODE_KEY]}: not readable ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError(f"node key {config[NODE_KEY]}: not an EC private key")
    roster_path = Path(str(config[ROSTER_KEY]))
    roster = load_roster(roster_path, Path(str(config[CA_KEY])))
    accept_roster(Path(str(config[ROSTER_STATE_KEY])), roster, f"consortium roster {roster_path}")
    return identity_of(key, roster)


def identity_of(key: ec.EllipticCurvePrivateKey, roster: Roster) -> SecAggIdentity:
    """``key``'s identity on ``roster``.

    Raises:
        SecAggError: the key is not enrolled (a stale roster, or the wrong key).
    """
    name = roster.name_of(key.public_key())
    if name is None:
        raise SecAggError("this hospital's node key is not on the consortium roster (stale "
                          f"roster? ask the coordinator for the current {ROSTER_FILE})")
    return SecAggIdentity(name, key, roster)


@dataclass(frozen=True)
class SetupKeys:
    """What a hospital signs at setup: its round keys and the noise it will add.

    Attributes:
        run_id, server_round, node: where the keys are valid (a signature for one node id, round
            and run cannot be replayed under another).
        c_public, s_public: its X25519 public keys (share encryption, mask agreement), 32 bytes.
        noise_share: std of the client-level DP noise it adds to its update, over the clip norm
            (0 without client-level DP); peers adding less are not counted as protecting it.
    """

    run_id: int
    server_round: int
    node: int
    c_public: bytes
    s_public: bytes
    noise_share: float

    def payload(self) -> bytes:
        if not math.isfinite(self.noise_share) or self.noise_share < 0:
            raise SecAggError(f"noise share {self.noise_share} is not a finite value >= 0")
        return _canonical({"context": _SETUP_CONTEXT, "run": int(self.run_id),
                           "round": int(self.server_round), "node": str(int(self.node)),
                           "c": self.c_public.hex(), "s": self.s_public.hex(),
                           "noise": float(self.noise_share).hex()})


def sign_setup(key: ec.EllipticCurvePrivateKey, keys: SetupKeys) -> bytes:
    """The hospital's ECDSA signature (DER) on its setup keys."""
    return key.sign(keys.payload(), ec.ECDSA(hashes.SHA384()))


def verify_setup(roster: Roster, name: str, keys: SetupKeys, signature: bytes) -> bool:
    """Whether ``signature`` on ``keys`` is by hospital ``name``'s enrolled node key."""
    public = roster.keys.get(name)
    if public is None:
        return False
    try:
        public.verify(bytes(signature), keys.payload(), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, SecAggError, ValueError):
        return False
    return True


def _survivors_payload(run_id: int, server_round: int, survivors: list[int]) -> bytes:
    return _canonical({"context": _SURVIVORS_CONTEXT, "run": int(run_id),
                       "round": int(server_round),
                       "survivors": [str(int(n)) for n in sorted(set(survivors))]})


def sign_survivors(key: ec.EllipticCurvePrivateKey, run_id: int, server_round: int,
                   survivors: list[int]) -> bytes:
    """The hospital's signature on the round's survivor set (the consistency check: every
    hospital unmasks only a set that a majority of its group signed, so the coordinator cannot
    show different hospitals different sets)."""
    return key.sign(_survivors_payload(run_id, server_round, survivors),
                    ec.ECDSA(hashes.SHA384()))


def verify_survivors(roster: Roster, name: str, run_id: int, server_round: int,
                     survivors: list[int], signature: bytes) -> bool:
    """Whether ``signature`` on this survivor set is by hospital ``name``'s enrolled key."""
    public = roster.keys.get(name)
    if public is None:
        return False
    try:
        public.verify(bytes(signature), _survivors_payload(run_id, server_round, survivors),
                      ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
