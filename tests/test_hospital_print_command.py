"""``medfed hospital start --print-command`` prints the daemon's commands and changes nothing a
running daemon holds: its SuperNode and SuperExec share the SuperExec secret written at start."""

from __future__ import annotations

from client.daemon import SUPEREXEC_SECRET_FILE, supernode_command
from client.site_folder import init_site_folder
from medfed_cli.main import main


def test_print_command_keeps_the_running_daemons_secret(tmp_path, capsys):
    site = tmp_path / "site"
    init_site_folder(site, "st-marys", superlink="127.0.0.1:9092")
    started = supernode_command(site, insecure=True)  # what a start writes
    secret = site / SUPEREXEC_SECRET_FILE
    held = secret.read_bytes()
    assert str(secret.resolve()) in started and len(held) == 32

    assert main(["hospital", "start", "--dir", str(site), "--insecure", "--print-command"]) == 0
    printed = capsys.readouterr().out
    assert "flower-supernode" in printed and str(secret.resolve()) in printed
    assert "client.warm_exec" in printed
    assert secret.read_bytes() == held  # the running daemon still authenticates

    # With no secret yet (never started), printing makes one the printed command names.
    secret.unlink()
    assert main(["hospital", "start", "--dir", str(site), "--insecure", "--print-command"]) == 0
    assert secret.is_file() and (secret.stat().st_mode & 0o777) == 0o600
