"""The coordinator's consortium folder: CA, TLS certificate, config and the enrolment list.

``medfed coordinator init DIR`` lays it out::

    DIR/coordinator.toml        the coordinator's config (CoordinatorConfig)
    DIR/ca/ca.pem               consortium CA certificate: give it to every hospital
    DIR/ca/ca.key               CA private key (0600): keep offline once certificates are made
    DIR/tls/server.pem          the SuperLink's TLS certificate, signed by the CA
    DIR/tls/server.key          its private key (0600)
    DIR/enrolment.toml          hospitals enrolled (public key, fingerprint, dates, revoked)
    DIR/roster.toml             the active hospitals' names and keys, signed by the CA: give it
                                to every hospital with ca.pem (secure aggregation counts only
                                peers on it); rewritten by every enrolment and revocation
    DIR/hospitals/NAME.pub      each enrolled hospital's OpenSSH public key, as received

Enrolling records a hospital's node-authentication public key; revoking marks it revoked (the
entry stays, for the audit trail). ``active_keys`` is what the coordinator registers with the
SuperLink (``flwr supernode register``) so that an unenrolled or revoked hospital is refused at
connection by Flower's node authentication.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from core.errors import MedfedError
from core.settings import SettingsError, load_settings, read_settings, read_toml, setting
from privacy.pki import (
    certificate_pem,
    load_ca,
    load_certificate,
    load_node_public_key,
    make_ca,
    make_server_certificate,
    node_public_openssh,
    private_key_pem,
    public_key_fingerprint,
    verify_signed_by,
    write_ca,
    write_private,
)
from privacy.secagg.config import SecAggError
from privacy.secagg.identity import ROSTER_FILE, Roster, parse_roster, write_roster

logger = logging.getLogger(__name__)

CONFIG_FILE = "coordinator.toml"
ENROLMENT_FILE = "enrolment.toml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConsortiumError(MedfedError, ValueError):
    """A consortium folder, config or enrolment request that cannot be used as is."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator's settings (``coordinator.toml``); paths are relative to the folder.

    Attributes:
        consortium: the consortium's name (in the CA subject).
        host, port: where the SuperLink's Fleet API listens (hospitals connect to
            ``hostname:port``); nothing else is served there.
        admin_port: the loopback port (127.0.0.1) of the Control and Runtime APIs (run
            submission, node registry, the ServerApp); ``0``: ``port + 1``.
        hostnames: names and IPs in the TLS certificate besides localhost/127.0.0.1.
        ca_cert, ca_key, server_cert, server_key: the PKI files.
        enrolment: the enrolment list.
        run_dir: where runs write records and per-round checkpoints.
        wait_for_hospitals_s: before round 1, how long (s) the run waits for every active
            enrolled hospital to connect; it starts earlier when all have, and with those
            connected (at least the study's ``min_hospitals``) when the wait ends.
        roster_valid_days: how long each newly signed roster is valid (days); hospitals refuse
            it afterwards, so re-sign it (``medfed coordinator sign-roster``) before then.
        second_session_gap_s: two heartbeats one node key signed less than this many seconds
            apart count as a sign of two live SuperNodes on that key (a stolen ``node.key``;
            three such pairs get the key revoked). The default, Flower's heartbeat call
            timeout, is the smallest gap one SuperNode's retries can leave; up to 15 s (below
            one SuperNode's shortest heartbeat period, 17.5 s) a second session is caught
            sooner, at the cost of counting quick retries after a failed heartbeat call as
            close pairs. Loopback tests raise it; keep the default in a consortium.
    """

    consortium: str
    host: str = "0.0.0.0"
    port: int = setting(8000, ge=1, le=65535)
    admin_port: int = setting(0, ge=0, le=65535)
    hostnames: list[str] = field(default_factory=list)
    ca_cert: str = "ca/ca.pem"
    ca_key: str = "ca/ca.key"
    server_cert: str = "tls/server.pem"
    server_key: str = "tls/server.key"
    enrolment: str = ENROLMENT_FILE
    run_dir: str = "runs"
    wait_for_hospitals_s: float = setting(120.0, ge=0.0)
    roster_valid_days: float = setting(30.0, gt=0.0)
    # core.flower_compat.SECOND_SESSION_GAP_S (Flower's heartbeat call timeout), written out
    # so that reading this file does not import Flower; a test keeps the two equal. Bounds: a
    # gap below the call timeout would miss real second sessions; one above a SuperNode's
    # shortest period (17.5 s) would flag every single SuperNode.
    second_session_gap_s: float = setting(5.0, ge=5.0, le=15.0)

    @property
    def control_port(self) -> int:
        """The loopback admin port in use (``admin_port``, or ``port + 1`` when unset)."""
        return self.admin_port or self.port + 1


@dataclass(frozen=True)
class Enrolment:
    """One hospital on the enrolment list.

    Attributes:
        name: the hospital's name (``[A-Za-z0-9_.-]``, up to 64 characters).
        public_key: its OpenSSH public key line.
        fingerprint: ``SHA256:<hex>`` of the key (see ``privacy.pki.public_key_fingerprint``).
        enrolled_at: ISO 8601 UTC time of enrolment.
        revoked_at: ISO 8601 UTC time of revocation, ``""`` while active.
        node_id: the SuperLink's node id while the key is registered with it (``""``: not
            registered); see ``server.daemon.sync_registry``.
    """

    name: str
    public_key: str
    fingerprint: str
    enrolled_at: str
    revoked_at: str = ""
    node_id: str = ""

    @property
    def active(self) -> bool:
        return not self.revoked_at


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def init_consortium(folder: Path, consortium: str, hostnames: list[str] | None = None,
                    host: str = "0.0.0.0", port: int = 8000,
                    admin_port: int = 0) -> CoordinatorConfig:
    """Create the consortium folder: CA, TLS certificate, config and an empty enrolment list.

    Raises:
        ConsortiumError: ``folder`` already holds a ``coordinator.toml`` (never overwritten:
            a new CA would lock out every enrolled hospital).
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists():
        raise ConsortiumError(f"{folder / CONFIG_FILE} exists: this folder is already a "
                              f"consortium; choose another folder")
    config = CoordinatorConfig(consortium=consortium, host=host, port=port,
                               admin_port=admin_port, hostnames=list(hostnames or []))
    (folder / "ca").mkdir(parents=True, exist_ok=True)
    (folder / "tls").mkdir(parents=True, exist_ok=True)
    (folder / "hospitals").mkdir(parents=True, exist_ok=True)
    (folder / config.run_dir).mkdir(parents=True, exist_ok=True)
    ca = make_ca(consortium)
    write_ca(ca, folder / config.ca_cert, folder / config.ca_key)
    cert, key = make_server_certificate(ca, config.hostnames)
    (folder / config.server_cert).write_bytes(certificate_pem(cert))
    write_private(folder / config.server_key, private_key_pem(key))
    _write_enrolments(folder / config.enrolment, [])
    (folder / CONFIG_FILE).write_text(tomli_w.dumps({"coordinator": asdict(config)}))
    return config


def load_coordinator_config(folder: Path) -> CoordinatorConfig:
    """Read ``DIR/coordinator.toml``; errors name the file and the setting."""
    path = Path(folder) / CONFIG_FILE
    values = read_settings(
        path, CoordinatorConfig, ConsortiumError, str(path), table="coordinator",
        unreadable_hint=f"; run 'medfed coordinator init {folder}' first",
    )
    if "consortium" not in values:
        raise ConsortiumError(f"{path}: set 'consortium' in [coordinator]")
    return CoordinatorConfig(**values)


def check_consortium(folder: Path) -> CoordinatorConfig:
    """Load the config and check that the TLS certificate is signed by the CA and valid now.

    Reads the CA's certificate only: its private key is needed to make certificates
    (``init``), never to run, and may be kept offline."""
    config = load_coordinator_config(folder)
    ca_cert = load_certificate(Path(folder) / config.ca_cert)
    verify_signed_by(load_certificate(Path(folder) / config.server_cert), ca_cert)
    return config


def load_enrolments(folder: Path) -> list[Enrolment]:
    """The enrolment list, in enrolment order."""
    path = Path(folder) / load_coordinator_config(folder).enrolment
    label = f"enrolment list {path}"
    values = read_toml(path, label, error=ConsortiumError)
    if set(values) - {"hospital"} or not isinstance(values.get("hospital", []), list):
        raise ConsortiumError(f"{label}: holds only [[hospital]] entries, found "
                              f"{sorted(values)}; restore it from a backup")
    return [_enrolment(entry, f"{label} [[hospital]] {i + 1}")
            for i, entry in enumerate(values.get("hospital", []))]


def _enrolment(entry: Any, where: str) -> Enrolment:
    """One ``[[hospital]]`` entry, read by the typed reader (an unknown key, a wrong type or a
    missing key is refused naming the entry)."""
    if isinstance(entry, dict):
        missing = [f.name for f in fields(Enrolment)
                   if f.default is MISSING and f.name not in entry]
        if missing:
            raise ConsortiumError(f"{where}: missing {missing}; restore the list from a backup")
    try:
        return load_settings(Enrolment, entry, where)
    except SettingsError as err:
        raise ConsortiumError(str(err)) from err


def _write_enrolments(path: Path, entries: list[Enrolment]) -> None:
    # Written to a temporary file and renamed, so a crash never leaves a half list.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps({"hospital": [asdict(e) for e in entries]}))
    tmp.replace(path)


def enrol(folder: Path, name: str, public_key_file: Path, publish: bool = True) -> Enrolment:
    """Enrol hospital ``name`` with the public key in ``public_key_file``, then re-sign the
    roster (``publish``; a no-op with a warning while the CA key is offline).

    Raises:
        ConsortiumError: bad name, the name is taken by an active hospital, or the key is
            enrolled already (under any name); re-enrolling a revoked name with a new key works.
        privacy.pki.KeyFileError: the key file is not an OpenSSH EC public key.
    """
    folder = Path(folder)
    if not NAME_PATTERN.match(name):
        raise ConsortiumError(f"hospital name '{name}': use letters, digits, '_', '.', '-' "
                              f"(up to 64, starting with a letter or digit)")
    key = load_node_public_key(public_key_file)
    fingerprint = public_key_fingerprint(key)
    entries = load_enrolments(folder)
    for entry in entries:
        if entry.fingerprint == fingerprint:
            if entry.revoked_at:
                raise ConsortiumError(f"this key ({fingerprint}) was revoked (hospital "
                                      f"'{entry.name}'); a revoked key is never re-enrolled: "
                                      f"the hospital makes a new one with 'medfed hospital init'")
            raise ConsortiumError(f"this key ({fingerprint}) is already enrolled as hospital "
                                  f"'{entry.name}'")
        if entry.name == name and entry.active:
            raise ConsortiumError(f"hospital '{name}' is enrolled already; revoke it first to "
                                  f"replace its key")
    line = node_public_openssh(key, comment=name).decode().strip()
    entry = Enrolment(name=name, public_key=line, fingerprint=fingerprint,
                      enrolled_at=_utc_now())
    (folder / "hospitals").mkdir(exist_ok=True)
    (folder / "hospitals" / f"{name}.pub").write_text(line + "\n")
    _write_enrolments(folder / load_coordinator_config(folder).enrolment, [*entries, entry])
    if publish:
        publish_roster(folder)
    return entry


def revoke(folder: Path, name: str, publish: bool = True) -> Enrolment:
    """Mark hospital ``name``'s active enrolment revoked, then re-sign the roster (``publish``;
    a no-op with a warning while the CA key is offline: see :func:`ca_key_here`).

    Raises:
        ConsortiumError: no active hospital by that name.
    """
    folder = Path(folder)
    entries = load_enrolments(folder)
    for i, entry in enumerate(entries):
        if entry.name == name and entry.active:
            entries[i] = Enrolment(**{**asdict(entry), "revoked_at": _utc_now()})
            (folder / "hospitals" / f"{name}.pub").unlink(missing_ok=True)
            _write_enrolments(folder / load_coordinator_config(folder).enrolment, entries)
            if publish:
                publish_roster(folder)
            return entries[i]
    known = sorted(e.name for e in entries if e.active)
    raise ConsortiumError(f"no enrolled hospital '{name}'; enrolled: {known or 'none'}")


def replace_key(folder: Path, name: str, public_key_file: Path) -> tuple[Enrolment, Enrolment]:
    """Re-enrol hospital ``name`` with a new key (``medfed hospital rotate-key``): its active
    enrolment is revoked and the new key enrolled under the same name, then the roster is
    re-signed once (serial + 1: the old key stops counting as a secure-aggregation peer).

    Returns:
        ``(revoked, enrolled)``: the old entry, now revoked, and the new one.

    A hospital whose only entries are revoked (the gate revokes a key seen in two live
    sessions) gets the new key enrolled under its name.

    Raises:
        ConsortiumError: no hospital ``name``, or the new key is enrolled or revoked
            already (under any name: a revoked key is never re-enrolled).
        privacy.pki.KeyFileError: the key file is not an OpenSSH EC public key.
    """
    folder = Path(folder)
    fingerprint = public_key_fingerprint(load_node_public_key(public_key_file))
    for entry in load_enrolments(folder):
        if entry.fingerprint == fingerprint:
            raise ConsortiumError(f"the new key ({fingerprint}) is already on the enrolment "
                                  f"list (hospital '{entry.name}'); the hospital makes a new "
                                  f"one with 'medfed hospital rotate-key'")
    entries = load_enrolments(folder)
    if any(e.name == name and e.active for e in entries):
        old = revoke(folder, name, publish=False)
    else:  # revoked already (e.g. by the gate, for a second live session on its key)
        revoked = [e for e in entries if e.name == name]
        if not revoked:
            known = sorted(e.name for e in entries)
            raise ConsortiumError(f"no hospital '{name}' to replace the key of; enrolled: "
                                  f"{known or 'none'}")
        old = revoked[-1]
    new = enrol(folder, name, public_key_file, publish=False)
    publish_roster(folder)
    return old, new


def ca_key_here(folder: Path) -> Path | None:
    """The CA private key's path if it is in the consortium folder (``None``: kept offline)."""
    path = Path(folder) / load_coordinator_config(folder).ca_key
    return path if path.is_file() else None


def roster_offline_message(folder: Path) -> str:
    """What the operator must do when the roster could not be re-signed here (CA key offline):
    until then hospitals keep counting the hospitals on the old roster, revoked ones included."""
    folder = Path(folder)
    key = Path(folder) / load_coordinator_config(folder).ca_key
    return (f"{ROSTER_FILE} was NOT re-signed: the CA key {key} is not here (kept offline), "
            f"so hospitals still count the hospitals on the old roster (a revoked key included) "
            f"until it expires. Where the CA key is, with a copy of {folder} (coordinator.toml, "
            f"enrolment.toml, ca/ca.pem, {ROSTER_FILE}), run 'medfed coordinator sign-roster "
            f"COPY --ca-key PATH/TO/ca.key', then copy COPY/{ROSTER_FILE} to "
            f"{folder / ROSTER_FILE} and to every hospital's site folder")


def current_roster(folder: Path) -> Roster | None:
    """The consortium folder's roster, checked against its CA (expired or not); ``None``: no
    roster yet, or one from before roster serials (the next one is serial 1).

    Raises:
        ConsortiumError: the roster does not verify against the CA (edited or foreign).
    """
    folder = Path(folder)
    config = load_coordinator_config(folder)
    path = folder / ROSTER_FILE
    if not path.is_file():
        return None
    try:
        return parse_roster(path.read_text(), (folder / config.ca_cert).read_bytes(), str(path))
    except SecAggError as err:
        if "has no serial" in str(err):
            return None
        raise ConsortiumError(f"{err}; move it away to start again at serial 1 (hospitals "
                              f"that accepted a higher serial will refuse it)") from err
    except OSError as err:
        raise ConsortiumError(f"{path}: cannot read it ({err})") from err


def sign_roster(folder: Path, ca_key: Path | None = None,
                valid_days: float | None = None) -> Roster:
    """Sign the active hospitals' names and keys into ``DIR/roster.toml`` with serial one more
    than the current roster's, valid ``valid_days`` (default: ``roster_valid_days``).

    Args:
        folder: the consortium folder (or a copy of it where the CA key is kept).
        ca_key: the CA private key (default: the config's ``ca_key`` in the folder).

    Raises:
        ConsortiumError: the CA key is not there (with what to do), or the current roster
            does not verify.
    """
    folder = Path(folder)
    config = load_coordinator_config(folder)
    key_path = Path(ca_key) if ca_key is not None else folder / config.ca_key
    if not key_path.is_file():
        raise ConsortiumError(roster_offline_message(folder) if ca_key is None else
                              f"CA key {key_path}: no such file; give the consortium's "
                              f"ca/ca.key with --ca-key")
    current = current_roster(folder)
    serial = (current.serial if current else 0) + 1
    ca = load_ca(folder / config.ca_cert, key_path)
    write_roster(folder / ROSTER_FILE, ca.key, config.consortium, active_keys(folder),
                 serial=serial, valid_days=valid_days or config.roster_valid_days)
    signed = current_roster(folder)
    if signed is None:
        raise ConsortiumError(f"{folder / ROSTER_FILE}: not readable after signing it")
    logger.info("signed %s serial %d (expires %s): %s", folder / ROSTER_FILE, signed.serial,
                signed.expires_at, ", ".join(sorted(signed.keys)) or "no hospitals")
    return signed


ROSTER_WARN_DAYS = 7.0
"""``roster_warning`` speaks up this many days before the roster expires."""


def roster_warning(folder: Path, now: dt.datetime | None = None) -> str | None:
    """What is wrong with the consortium folder's roster for secure aggregation, if anything:
    missing, from before serials, expired, or expiring within :data:`ROSTER_WARN_DAYS`."""
    folder = Path(folder)
    try:
        roster = current_roster(folder)
    except ConsortiumError as err:
        return str(err)
    if roster is None:
        return (f"{folder / ROSTER_FILE}: missing or from before roster serials; hospitals "
                f"refuse it: run 'medfed coordinator sign-roster' where the CA key is")
    now = now or dt.datetime.now(dt.UTC)
    left = dt.datetime.fromisoformat(roster.expires_at) - now
    if left <= dt.timedelta(0):
        return (f"{folder / ROSTER_FILE}: serial {roster.serial} expired at "
                f"{roster.expires_at}; hospitals refuse it: re-sign it ('medfed coordinator "
                f"sign-roster') and send it to every hospital")
    if left < dt.timedelta(days=ROSTER_WARN_DAYS):
        return (f"{folder / ROSTER_FILE}: serial {roster.serial} expires at "
                f"{roster.expires_at}; re-sign it before then ('medfed coordinator "
                f"sign-roster') and send it to every hospital")
    return None


def publish_roster(folder: Path) -> Path | None:
    """Re-sign ``DIR/roster.toml`` (:func:`sign_roster`) when the CA key is in the folder.

    Returns the roster's path, or ``None`` when the CA key is not in the folder (kept offline):
    then the roster is left as it was - stale until re-signed where the key is, so a newly
    enrolled hospital does not count yet and a revoked one still does (callers say so:
    :func:`roster_offline_message`).
    """
    folder = Path(folder)
    if ca_key_here(folder) is None:
        logger.warning("CA key not in %s: %s not re-signed (see 'medfed coordinator "
                       "sign-roster')", folder, ROSTER_FILE)
        return None
    sign_roster(folder)
    return folder / ROSTER_FILE


def active_keys(folder: Path) -> dict[str, str]:
    """Hospital name -> OpenSSH public key line, for every active (not revoked) enrolment."""
    return {e.name: e.public_key for e in load_enrolments(folder) if e.active}


def set_node_id(folder: Path, fingerprint: str, node_id: str) -> None:
    """Record (or clear, with ``""``) the SuperLink node id of the enrolment with this key."""
    folder = Path(folder)
    entries = [Enrolment(**{**asdict(e), "node_id": node_id}) if e.fingerprint == fingerprint
               else e for e in load_enrolments(folder)]
    _write_enrolments(folder / load_coordinator_config(folder).enrolment, entries)
