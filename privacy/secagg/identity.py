"""Who a secure-aggregation peer is: the consortium roster and signed setup keys.

A hospital accepts a peer's round keys only when they are signed by a node key on the
consortium's *roster*: the list of enrolled hospitals (name and node-authentication public key),
signed by the consortium CA. The roster reaches the hospital with ``ca.pem`` when it joins (a
file in its site folder), never from the coordinator at run time, so a coordinator that invents
hospitals cannot make them count: it holds no enrolled node key and cannot re-sign the roster
without the CA's private key (kept offline once hospitals are enrolled).

Everything here is ``cryptography``: ECDSA over the curve of each key (P-384, as Flower makes node
keys) with SHA-384; the signed bytes are canonical JSON, so the check does not depend on how a
TOML writer lays a file out.
"""

from __future__ import annotations

import base64
import datetime as dt
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
_ROSTER_CONTEXT = "medfed consortium roster v1"
_SURVIVORS_CONTEXT = "medfed secagg survivors v1"


@dataclass(frozen=True)
class Roster:
    """The consortium's enrolled hospitals, as the CA signed them.

    Attributes:
        consortium: the consortium's name.
        issued_at: when the CA signed this list (ISO 8601 UTC).
        keys: hospital name -> its node-authentication public key.
    """

    consortium: str
    issued_at: str
    keys: dict[str, ec.EllipticCurvePublicKey]

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


def _roster_body(consortium: str, issued_at: str, hospitals: list[dict[str, str]]) -> bytes:
    return _canonical({"context": _ROSTER_CONTEXT, "consortium": consortium,
                       "issued_at": issued_at, "hospital": hospitals})


def write_roster(path: Path, ca_key: ec.EllipticCurvePrivateKey, consortium: str,
                 hospitals: dict[str, str]) -> None:
    """Sign and write the roster: ``hospitals`` maps each active hospital's name to its OpenSSH
    public key line. Written to a temporary file and renamed (never half a roster)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(roster_text(ca_key, consortium, hospitals))
    tmp.replace(path)


def roster_text(ca_key: ec.EllipticCurvePrivateKey, consortium: str,
                hospitals: dict[str, str]) -> str:
    """The signed roster file's text (see :func:`write_roster`)."""
    entries = []
    for name, line in sorted(hospitals.items()):
        key = serialization.load_ssh_public_key(line.encode())
        entries.append({"name": name, "public_key": line.strip(),
                        "fingerprint": public_key_fingerprint(key)})
    issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    signature = ca_key.sign(_roster_body(consortium, issued_at, entries),
                            ec.ECDSA(hashes.SHA384()))
    return ("# The consortium's enrolled hospitals, signed by its CA (medfed). Give it to every\n"
            "# hospital with ca.pem; a hospital counts a secure-aggregation peer only if it is\n"
            "# on this list. Any edit breaks the signature.\n") + tomli_w.dumps({
                "consortium": consortium, "issued_at": issued_at,
                "signature": base64.b64encode(signature).decode(), "hospital": entries})


def load_roster(path: Path, ca_cert: Path) -> Roster:
    """Read the roster and check the CA's signature on it.

    Raises:
        SecAggError: the file or certificate is unreadable, the signature does not verify
            against ``ca_cert``, or an entry is malformed (its fingerprint does not match its
            key, a name or key twice).
    """
    try:
        text, ca_pem = Path(path).read_text(), Path(ca_cert).read_bytes()
    except OSError as err:
        raise SecAggError(f"consortium roster {path} or CA certificate {ca_cert}: cannot read "
                          f"it ({err}); copy both from the consortium") from err
    return parse_roster(text, ca_pem, f"consortium roster {path}")


def parse_roster(text: str, ca_pem: bytes, where: str = "consortium roster") -> Roster:
    """:func:`load_roster` on the file's text and the CA certificate's PEM bytes."""
    try:
        data = tomllib.loads(text)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise SecAggError(f"{where}: cannot parse it or the CA certificate ({err})") from err
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
    try:
        ca_public.verify(signature, _roster_body(consortium, issued_at, entries),
                         ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as err:
        raise SecAggError(f"{where}: not signed by the consortium CA (edited, or from another "
                          "consortium); ask the coordinator for the current one") from err
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
    return Roster(consortium, issued_at, keys)


def identity_from_node_config(context) -> SecAggIdentity:
    """The hospital daemon's identity: ``node-key``, ``secagg-roster`` and ``ca-cert`` in its
    node config (``medfed hospital start`` sets them from the site folder).

    Raises:
        SecAggError: a path is unset or unreadable, the roster does not verify, or this
            hospital's own key is not on it.
    """
    config = context.node_config
    missing = [k for k in (NODE_KEY, ROSTER_KEY, CA_KEY) if not config.get(k)]
    if missing:
        raise SecAggError(f"this hospital cannot take part in secure aggregation: node config "
                          f"lacks {missing} (the site folder's node.key, {ROSTER_FILE} and ca.pem)")
    try:
        key = serialization.load_ssh_private_key(Path(str(config[NODE_KEY])).read_bytes(),
                                                 password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise SecAggError(f"node key {config[NODE_KEY]}: not readable ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError(f"node key {config[NODE_KEY]}: not an EC private key")
    return identity_of(key, load_roster(Path(str(config[ROSTER_KEY])),
                                        Path(str(config[CA_KEY]))))


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
