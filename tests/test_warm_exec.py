"""The hospital daemon's warm SuperExec: commands, secrets, threads, and pre-imported tasks."""

import multiprocessing
import stat
import sys

import pytest
import tomli_w

from client.daemon import SUPEREXEC_SECRET_FILE, supernode_command, thread_env, warm_exec_command
from client.site_folder import SiteFolderError, init_site_folder, load_hospital_config
from client.warm_exec import WarmClientAppExecutor


def _site(tmp_path, **settings):
    site = tmp_path / "site"
    init_site_folder(site, "general")
    (site / "ca.pem").write_text("placeholder: the command only checks that it exists")
    values = load_hospital_config(site).__dict__ | settings
    (site / "hospital.toml").write_text(tomli_w.dumps({"hospital": values}))
    return site


def test_warm_by_default_with_a_fresh_private_secret_per_start(tmp_path):
    site = _site(tmp_path, runtime_port=9123)
    argv = supernode_command(site)
    assert argv[argv.index("--isolation") + 1] == "process"
    secret = site / SUPEREXEC_SECRET_FILE
    assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(secret.resolve())
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    first = secret.read_bytes()
    supernode_command(site)
    assert secret.read_bytes() != first  # a new secret at each start

    warm = warm_exec_command(site, 4242)
    assert warm[:3] == [sys.executable, "-m", "client.warm_exec"]
    assert warm[warm.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    assert warm[warm.index("--superexec-auth-secret-file") + 1] == str(secret.resolve())
    assert warm[warm.index("--parent-pid") + 1] == "4242"


def test_the_subprocess_executor_is_medfeds_cold_superexec_never_flowers(tmp_path):
    # Flower's own executor would import the ClientApp the run's FAB names: the SuperNode
    # always hands its tasks to medfed's SuperExec, which starts fresh processes here.
    site = _site(tmp_path, clientapp_executor="subprocess", cpu_threads=1)
    argv = supernode_command(site)
    assert argv[argv.index("--isolation") + 1] == "process"
    cold = warm_exec_command(site, 1)
    assert cold[:3] == [sys.executable, "-m", "client.warm_exec"] and "--cold" in cold
    assert "--cold" not in warm_exec_command(_site(tmp_path / "warm"), 1)
    assert thread_env(site) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert thread_env(_site(tmp_path / "other")) == {}


@pytest.mark.parametrize("superlink, allowed", [
    ("localhost:9092", True), ("127.0.0.1:9092", True), ("[::1]:9092", True),
    ("10.1.2.3:9092", False), ("coordinator.example.org:9092", False), ("0.0.0.0:9092", False)])
def test_insecure_is_refused_unless_the_coordinator_is_on_loopback(tmp_path, superlink, allowed):
    site = _site(tmp_path, superlink=superlink)
    if allowed:
        assert supernode_command(site, insecure=True)[-1] == "--insecure"
    else:
        with pytest.raises(SiteFolderError, match="--insecure .* is refused.*loopback"):
            supernode_command(site, insecure=True)
        assert "--insecure" not in supernode_command(site)  # TLS works as before


def test_only_clientapp_tasks_are_taken_and_launched():
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from client.warm_exec import ColdClientAppExecutor

    executor = ColdClientAppExecutor()
    every = {TaskType.CLIENT_APP, TaskType.SERVER_APP, TaskType.AGENT_APP}
    assert executor.get_eligible_capacity(every) == ({TaskType.CLIENT_APP}, set())
    spec = ExecutionSpec(task_type=TaskType.AGENT_APP, runtime_api_address="127.0.0.1:1",
                         token="t", insecure=True, root_certificates_path=None,
                         runtime_dependency_install=True, parent_pid=None,
                         suppress_output=True, task_id=1)
    result = executor.launch(spec)
    assert result.status == "failed" and "ClientApp tasks only" in result.message
    assert executor._tasks == []  # nothing was started


@pytest.mark.parametrize("settings, field", [({"clientapp_executor": "cold"}, "clientapp_executor"),
                                             ({"cpu_threads": -1}, "cpu_threads")])
def test_bad_executor_settings_name_the_field(tmp_path, settings, field):
    site = _site(tmp_path, **settings)
    with pytest.raises(SiteFolderError, match=field):
        load_hospital_config(site)


def _imported(queue) -> None:
    queue.put(sorted(m for m in ("client.app", "torch", "peft", "monai") if m in sys.modules))


@pytest.mark.slow
def test_task_processes_fork_from_a_server_that_imported_the_clientapp():
    executor = WarmClientAppExecutor()
    try:
        queue = multiprocessing.get_context("forkserver").Queue()
        task = executor._context.Process(target=_imported, args=(queue,))
        task.start()
        task.join(timeout=60)
        assert queue.get(timeout=5) == ["client.app", "monai", "peft", "torch"]
    finally:
        executor.close()
