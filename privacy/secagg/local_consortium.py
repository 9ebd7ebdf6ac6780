"""A throwaway consortium for simulations and tests: a fresh CA, one node key per hospital and
the CA-signed roster, all in memory and made from the OS's CSPRNG (nothing is replayable).

Simulated hospitals have no site folder, yet secure aggregation checks every peer against an
enrolled key; this gives them real keys and a real roster, so the checks that protect a
deployment run unchanged in a simulation. The loader pickles (Flower's simulation engine sends
the ClientApp to Ray actors): keys travel as PEM bytes and are parsed on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from privacy.pki import certificate_pem, make_ca, make_node_key, node_public_openssh
from privacy.secagg.config import SecAggError
from privacy.secagg.identity import SecAggIdentity, identity_of, parse_roster, roster_text


def hospital_key(context) -> int:
    """Which hospital a context is: its ``partition-id`` (simulation), else its node id."""
    return int(context.node_config.get("partition-id", context.node_id))


@dataclass
class LocalConsortium:
    """``IdentityLoader`` for hospitals ``keys`` (partition ids or node ids, see
    :func:`hospital_key`); build it with :func:`local_consortium`.

    Attributes:
        ca_pem: the CA certificate.
        roster: the signed roster's text.
        node_keys: hospital -> its node private key (PKCS#8 PEM).
    """

    ca_pem: bytes
    roster: str
    node_keys: dict[int, bytes]
    _cache: dict[int, SecAggIdentity] = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, context) -> SecAggIdentity:
        hospital = hospital_key(context)
        if hospital not in self._cache:
            if hospital not in self.node_keys:
                raise SecAggError(f"hospital {hospital} has no key in this consortium")
            key = serialization.load_pem_private_key(self.node_keys[hospital], password=None)
            self._cache[hospital] = identity_of(key, parse_roster(self.roster, self.ca_pem))
        return self._cache[hospital]

    def __getstate__(self) -> dict:
        return {"ca_pem": self.ca_pem, "roster": self.roster, "node_keys": self.node_keys}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def local_consortium(hospitals: list[int], name: str = "simulation") -> LocalConsortium:
    """A consortium whose roster enrols every hospital in ``hospitals`` as ``hospital-<id>``."""
    ca = make_ca(name)
    keys = {h: make_node_key() for h in hospitals}
    lines = {f"hospital-{h}": node_public_openssh(k.public_key()).decode().strip()
             for h, k in keys.items()}
    pem = {h: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()) for h, k in keys.items()}
    return LocalConsortium(certificate_pem(ca.certificate), roster_text(ca.key, name, lines), pem)
