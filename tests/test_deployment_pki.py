"""Consortium PKI, enrolment and the hospital's site folder, checked with the TLS
stack and Flower's own key loaders."""

import argparse
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import (
    public_key_to_bytes,
    sign_message,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from client.site_folder import (
    SiteFolderError,
    init_site_folder,
    load_hospital_config,
    node_config,
)
from medfed_cli.main import main as medfed
from privacy.pki import KeyFileError, load_certificate, make_ca, verify_signed_by
from privacy.policy import load_site_policy
from server.consortium import (
    ConsortiumError,
    active_keys,
    check_consortium,
    enrol,
    init_consortium,
    load_enrolments,
    revoke,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def consortium(tmp_path):
    folder = tmp_path / "consortium"
    config = init_consortium(folder, "test", hostnames=["coord.example.org", "10.1.2.3"])
    return folder, config


def test_consortium_certificates_and_private_key_modes(consortium):
    folder, config = consortium
    assert check_consortium(folder) == config
    cert = load_certificate(folder / config.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1",
                                                                          "10.1.2.3"}
    assert _mode(folder / config.ca_key) == 0o600
    assert _mode(folder / config.server_key) == 0o600
    assert load_enrolments(folder) == []
    with pytest.raises(KeyFileError, match="not signed by"):
        verify_signed_by(cert, make_ca("other").certificate)
    with pytest.raises(ConsortiumError, match="already a consortium"):
        init_consortium(folder, "again")


def test_starting_the_coordinator_does_not_need_the_ca_private_key(consortium):
    """The CA key makes certificates at init; kept offline, the coordinator still starts."""
    from server.daemon import superlink_command

    folder, config = consortium
    (folder / config.ca_key).unlink()
    assert check_consortium(folder) == config
    argv = superlink_command(folder)
    assert str(folder / config.ca_key) not in " ".join(argv)
    # A server certificate from another CA is still refused without it.
    other = make_ca("other")
    from privacy.pki import certificate_pem, make_server_certificate

    cert, _ = make_server_certificate(other, [])
    (folder / config.server_cert).write_bytes(certificate_pem(cert))
    with pytest.raises(KeyFileError, match="not signed by"):
        check_consortium(folder)


def test_tls_handshake_on_loopback_trusts_only_the_consortium_ca(consortium, tmp_path):
    """The server certificate works for a real TLS connection to localhost; a client trusting
    another CA refuses it."""
    folder, config = consortium
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / config.server_cert, folder / config.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(n):
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    good = ssl.create_default_context(cafile=str(folder / config.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            good.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("other").certificate.public_bytes(Encoding.PEM))
    bad = ssl.create_default_context(cafile=str(other))
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError):
        bad.wrap_socket(raw, server_hostname="localhost")
    thread.join(timeout=5)
    listener.close()


def test_hospital_keys_load_with_flowers_own_loaders(tmp_path):
    site = tmp_path / "st-mary"
    config = init_site_folder(site, "st-mary", superlink="coord.example.org:8000")
    assert _mode(site / config.node_key) == 0o600
    private, public = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(site / config.node_key),
                           auth_supernode_public_key=None))
    assert isinstance(private.curve, ec.SECP384R1)
    # What `flwr supernode register node.pub` sends is the same key the SuperNode signs with.
    assert try_load_public_key(site / config.node_pub) == public_key_to_bytes(public)
    assert verify_signature(public, b"nonce", sign_message(private, b"nonce"))
    with pytest.raises(SiteFolderError, match="already"):
        init_site_folder(site, "st-mary")


def test_site_folder_policy_template_and_node_config(tmp_path):
    site = tmp_path / "site"
    init_site_folder(site, "general", manifest="data/manifest.csv")
    config = load_hospital_config(site)
    policy = load_site_policy(site / config.privacy_policy)
    assert policy.max_epsilon > 0 and policy.require_dp
    keys = node_config(site, config)
    assert keys["manifest"] == str((site / "data/manifest.csv").resolve())
    assert keys["audit-log"].endswith("egress-audit.jsonl")
    assert set(keys) == {"manifest", "privacy-policy", "run-policy", "privacy-ledger",
                         "audit-log", "node-key", "secagg-roster", "ca-cert",
                         "secagg-roster-state", "embedding-cache"}
    (site / "hospital.toml").write_text('[hospital]\nname = "x"\nsuperlnk = "typo"\n')
    with pytest.raises(SiteFolderError, match="superlnk"):
        load_hospital_config(site)


def test_enrol_revoke_and_refusals(consortium, tmp_path):
    folder, _ = consortium
    a = init_site_folder(tmp_path / "a", "a")
    b = init_site_folder(tmp_path / "b", "b")
    enrol(folder, "a", tmp_path / "a" / a.node_pub)
    enrol(folder, "b", tmp_path / "b" / b.node_pub)
    assert set(active_keys(folder)) == {"a", "b"}
    with pytest.raises(ConsortiumError, match="already enrolled"):
        enrol(folder, "c", tmp_path / "a" / a.node_pub)
    b2 = init_site_folder(tmp_path / "b2", "b")
    with pytest.raises(ConsortiumError, match="enrolled already"):
        enrol(folder, "b", tmp_path / "b2" / b2.node_pub)  # name taken by an active hospital
    with pytest.raises(KeyFileError, match="cannot read"):
        enrol(folder, "c", tmp_path / "missing.pub")
    revoke(folder, "a")
    assert set(active_keys(folder)) == {"b"}
    with pytest.raises(ConsortiumError, match="revoked"):
        enrol(folder, "a", tmp_path / "a" / a.node_pub)  # a revoked key stays out
    with pytest.raises(ConsortiumError, match="no enrolled hospital 'a'"):
        revoke(folder, "a")
    # A new key for the same hospital is enrolled after the revocation.
    a2 = init_site_folder(tmp_path / "a2", "a")
    enrol(folder, "a", tmp_path / "a2" / a2.node_pub)
    assert [e.name for e in load_enrolments(folder)] == ["a", "b", "a"]
    assert [e.active for e in load_enrolments(folder)] == [False, True, True]


def test_enrol_refuses_bad_keys_and_names(consortium, tmp_path):
    folder, _ = consortium
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH))
    with pytest.raises(KeyFileError, match="NIST curve"):
        enrol(folder, "x", rsa_key)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(KeyFileError, match="OpenSSH public key"):
        enrol(folder, "x", garbage)
    site = init_site_folder(tmp_path / "s", "s")
    with pytest.raises(ConsortiumError, match="hospital name"):
        enrol(folder, "../evil", tmp_path / "s" / site.node_pub)


def test_cli_init_enroll_revoke(tmp_path, capsys):
    folder, site = tmp_path / "c", tmp_path / "h"
    assert medfed(["coordinator", "init", str(folder), "--hostname", "coord"]) == 0
    assert medfed(["hospital", "init", "h1", "--dir", str(site)]) == 0
    enroll = ["coordinator", "enroll", str(folder), "--hospital-key", str(site / "node.pub"),
              "--name", "h1"]
    assert medfed(enroll) == 0
    assert medfed(enroll) == 1  # the same key twice
    assert medfed(["coordinator", "revoke", str(folder), "--name", "h1"]) == 0
    assert medfed(["coordinator", "revoke", str(folder), "--name", "h1"]) == 1
    assert medfed(["coordinator", "hospitals", str(folder)]) == 0
    assert medfed(["coordinator", "init", str(folder)]) == 1


def test_app_folder_and_a_bad_study_is_refused_before_anything_starts(tmp_path, capsys):
    import tomllib

    from server.deployment_app import write_app_dir

    init_consortium(tmp_path / "c", "t")
    (tmp_path / "bad.toml").write_text("[federation]\nroundz = 2\n")
    assert medfed(["coordinator", "start", str(tmp_path / "c"), "--study",
                   str(tmp_path / "bad.toml")]) == 1
    assert "roundz" in capsys.readouterr().out
    assert not (tmp_path / "c" / "superlink-state.db").exists()
    # The Flower App: components from the installed medfed; no dependencies to install.
    app = write_app_dir(tmp_path / "c")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "medfed_app.server_app:app", "clientapp": "medfed_app.client_app:app"}
    assert "dependencies" not in project["project"]
