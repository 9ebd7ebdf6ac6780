"""Roster freshness and key rotation: the serial the coordinator signs, the serial a hospital
remembers, the offline-CA workflow (``coordinator sign-roster``), ``coordinator enroll
--replace`` and ``hospital rotate-key`` (the attacks are in
``tests/adversarial/test_attack_roster_and_stolen_keys.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomli_w

from client.site_folder import init_site_folder
from medfed_cli.main import main as medfed
from privacy.pki import load_ca
from privacy.secagg.config import SecAggError
from privacy.secagg.identity import ROSTER_FILE, load_roster, parse_roster, roster_text
from privacy.secagg.roster_state import ROSTER_STATE_FILE, accept_roster, read_accepted
from server.consortium import (
    ConsortiumError,
    current_roster,
    enrol,
    init_consortium,
    load_coordinator_config,
    load_enrolments,
)


@pytest.fixture
def consortium(tmp_path: Path) -> Path:
    """A consortium with two enrolled hospitals (sites ``tmp_path/a`` and ``tmp_path/b``)."""
    folder = tmp_path / "consortium"
    init_consortium(folder, "lungnet")
    for name in ("a", "b"):
        init_site_folder(tmp_path / name, name)
        enrol(folder, name, tmp_path / name / "node.pub")
    return folder


def _roster(folder: Path):  # noqa: ANN202
    return load_roster(folder / ROSTER_FILE, folder / "ca" / "ca.pem")


def test_each_enrolment_change_signs_the_next_serial_with_an_expiry(consortium):
    roster = _roster(consortium)
    assert roster.serial == 2 and sorted(roster.keys) == ["a", "b"]
    assert not roster.expired() and roster.expires_at > roster.issued_at
    assert medfed(["coordinator", "revoke", str(consortium), "--name", "b"]) == 0
    assert _roster(consortium).serial == 3 and sorted(_roster(consortium).keys) == ["a"]


def test_the_coordinator_is_warned_before_its_roster_expires(consortium):
    import datetime as dt

    from server.consortium import roster_warning

    expires = dt.datetime.fromisoformat(_roster(consortium).expires_at)
    assert roster_warning(consortium) is None
    assert "re-sign it before then" in roster_warning(consortium, expires - dt.timedelta(days=2))
    assert "expired at" in roster_warning(consortium, expires)
    (consortium / ROSTER_FILE).unlink()
    assert "missing" in roster_warning(consortium)


def test_roster_validity_comes_from_the_coordinators_config(consortium):
    path = consortium / "coordinator.toml"
    text = path.read_text()
    assert "roster_valid_days = 30.0" in text
    path.write_text(text.replace("roster_valid_days = 30.0", "roster_valid_days = 0"))
    with pytest.raises(ConsortiumError, match="roster_valid_days = 0"):
        load_coordinator_config(consortium)
    path.write_text(text.replace("roster_valid_days = 30.0", "roster_valid_dais = 3"))
    with pytest.raises(ConsortiumError, match="roster_valid_dais"):
        load_coordinator_config(consortium)


def test_revoke_with_the_ca_key_offline_fails_loudly_and_sign_roster_elsewhere_fixes_it(
        consortium, tmp_path, capsys):
    offline = tmp_path / "usb" / "ca.key"
    offline.parent.mkdir()
    shutil.move(consortium / "ca" / "ca.key", offline)
    assert medfed(["coordinator", "revoke", str(consortium), "--name", "b"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "roster.toml was NOT re-signed" in out and "sign-roster" in out
    assert "b" in _roster(consortium).keys  # stale: b still counts until re-signed
    assert load_enrolments(consortium)[1].revoked_at  # the revocation itself is done

    # Where the CA key is: a copy of the folder's public files, signed, copied back.
    copy = tmp_path / "signing-copy"
    (copy / "ca").mkdir(parents=True)
    for name in ("coordinator.toml", "enrolment.toml", "roster.toml", "ca/ca.pem"):
        shutil.copy(consortium / name, copy / name)
    assert medfed(["coordinator", "sign-roster", str(copy), "--ca-key", str(offline),
                   "--valid-days", "7"]) == 0
    assert "serial 3" in capsys.readouterr().out  # after the 2 enrolments' serials 1 and 2
    shutil.copy(copy / ROSTER_FILE, consortium / ROSTER_FILE)
    roster = _roster(consortium)
    assert roster.serial == 3 and sorted(roster.keys) == ["a"]
    assert medfed(["coordinator", "sign-roster", str(consortium)]) == 1  # no key here
    assert "NOT re-signed" in capsys.readouterr().out


def test_a_roster_from_before_serials_is_refused_with_what_to_do(consortium, tmp_path):
    ca = load_ca(consortium / "ca" / "ca.pem", consortium / "ca" / "ca.key")
    text = roster_text(ca.key, "lungnet", {})
    old = "\n".join(line for line in text.splitlines()
                    if not line.startswith(("serial", "expires_at")))
    with pytest.raises(SecAggError, match="has no serial or expiry.*sign-roster"):
        parse_roster(old, (consortium / "ca" / "ca.pem").read_bytes())
    (consortium / ROSTER_FILE).write_text(old)
    assert current_roster(consortium) is None  # the coordinator's next signing is serial 1
    assert medfed(["coordinator", "sign-roster", str(consortium)]) == 0
    assert _roster(consortium).serial == 1


def test_the_hospitals_roster_state_is_durable_strict_and_never_goes_back(consortium,
                                                                         tmp_path):
    state = tmp_path / "a" / ROSTER_STATE_FILE
    assert read_accepted(state).serial == 0
    two = _roster(consortium)
    assert accept_roster(state, two, "r").serial == 2
    assert read_accepted(state).digest == two.digest and not state.with_name(
        state.name + ".tmp").exists()
    accept_roster(state, two, "r")  # the same roster again: fine
    ca = load_ca(consortium / "ca" / "ca.pem", consortium / "ca" / "ca.key")
    twin = parse_roster(roster_text(ca.key, "lungnet", {}, serial=2),
                        (consortium / "ca" / "ca.pem").read_bytes())
    with pytest.raises(SecAggError, match="different roster under serial 2"):
        accept_roster(state, twin, "r")
    state.write_text(tomli_w.dumps({"serial": 2, "sereal": 3}))
    with pytest.raises(SecAggError, match="unknown keys"):
        read_accepted(state)


def test_rotate_key_then_enroll_replace(consortium, tmp_path, capsys):
    site = tmp_path / "a"
    old_pub = (site / "node.pub").read_text()
    assert medfed(["hospital", "rotate-key", "--dir", str(site)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--replace" in out and "node.pub" in out
    backups = sorted(p.name for p in site.glob("node.*.bak"))
    assert len(backups) == 2 and (site / backups[0]).stat().st_mode & 0o777 == 0o600
    assert (site / backups[1]).read_text() == old_pub != (site / "node.pub").read_text()
    assert (site / "node.key").stat().st_mode & 0o777 == 0o600

    assert medfed(["coordinator", "enroll", str(consortium), "--name", "a", "--hospital-key",
                   str(site / "node.pub"), "--replace"]) == 0
    entries = [e for e in load_enrolments(consortium) if e.name == "a"]
    assert [bool(e.revoked_at) for e in entries] == [True, False]
    assert entries[1].public_key.split()[1] == (site / "node.pub").read_text().split()[1]
    assert _roster(consortium).serial == 3
    # Replacing with a key already on the list (the old one, or the new one again) is refused.
    assert medfed(["coordinator", "enroll", str(consortium), "--name", "a", "--hospital-key",
                   str(site / "node.pub"), "--replace"]) == 1
    init_site_folder(tmp_path / "c", "c")
    assert medfed(["coordinator", "enroll", str(consortium), "--name", "nobody",
                   "--hospital-key", str(tmp_path / "c" / "node.pub"), "--replace"]) == 1
    assert "no hospital 'nobody'" in " ".join(capsys.readouterr().out.split())
