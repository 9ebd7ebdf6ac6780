"""The consortium's Flower App for the deployment engine (``flwr run`` on a running SuperLink).

The coordinator submits a *study* (``server.study.Study``: ``classes``, ``seed``, ``[model]``,
``[train]``, ``[federation]``, ``[privacy]``, ``[evaluation]``) and a run directory. The
SuperLink starts the ServerApp (:data:`server_app`), which runs the rounds exactly as the
simulation does; each hospital's SuperNode runs medfed's ClientApp (``client.app.app``), which
reads the hospital's data, policies, ledger and audit log from the SuperNode's node config. The
hospitals evaluate every round on their own held-out splits and the run directory holds their
combined results (the same files a simulation writes). The coordinator holds no data unless the
study names a test set of its own (``evaluation.test_manifest``): then each round's published
adapter is also scored on it (``test_*`` columns, ``federated`` in ``summary.json``).

The app folder :func:`write_app_dir` writes (``DIR/app``) is what ``flwr run`` packages (the
FAB): a ``pyproject.toml`` and two two-line modules that import the ServerApp and the ClientApp
from the medfed *installed* at each end. A hospital thus runs the medfed version it installed and
reviewed, not code the coordinator ships. Flower's runtime dependency install (``uv sync``) stays
off at both ends (``--disable-runtime-dependency-installation`` on the SuperLink; off by default
on SuperNodes).

The run directory is fixed per study (not timestamped), so the same command after a coordinator
crash resumes from the last checkpointed round (``server.checkpoint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

if TYPE_CHECKING:
    from server.simulation_app import ServerRun
    from server.study import Study

logger = logging.getLogger(__name__)

APP_DIR = "app"
"""The Flower App folder inside the consortium folder."""
STUDY_KEY = "study"
"""Run-config key: absolute path of the study TOML."""
RUN_DIR_KEY = "run-dir"
"""Run-config key: absolute path of the run directory (records, checkpoint, final adapter)."""
CONSORTIUM_KEY = "consortium"
"""Run-config key: absolute path of the consortium folder, whose enrolment list names the
hospitals in the run's records (optional: without it rows carry the ids the replies give)."""

_APP_PYPROJECT = {
    "project": {
        "name": "medfed-app",
        "version": "1.0.0",
        "description": "medfed's federated LoRA study on Flower's deployment engine",
        "license": "Apache-2.0",
    },
    "tool": {"flwr": {"app": {
        "publisher": "medfed",
        "components": {"serverapp": "medfed_app.server_app:app",
                       "clientapp": "medfed_app.client_app:app"},
        "config": {STUDY_KEY: "", RUN_DIR_KEY: "", CONSORTIUM_KEY: ""},
    }}},
}
_APP_MODULES = {
    "__init__.py": '"""medfed\'s Flower App: imports from the installed medfed."""\n',
    # Flower checks the components by reading the module (an assignment, not an import).
    "server_app.py": '"""The coordinator\'s ServerApp."""\n\n'
                     "from server.deployment_app import server_app\n\napp = server_app\n",
    "client_app.py": '"""The hospital\'s ClientApp (its installed medfed)."""\n\n'
                     "from client.app import app as client_app\n\napp = client_app\n",
}


def write_app_dir(folder: Path) -> Path:
    """Write (or refresh) the Flower App folder ``folder/app``; return its path."""
    app_dir = Path(folder).resolve() / APP_DIR
    package = app_dir / "medfed_app"
    package.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(_APP_PYPROJECT))
    for name, text in _APP_MODULES.items():
        (package / name).write_text(text)
    return app_dir


def run_config_args(study: Path, run_dir: Path, consortium: Path | None = None) -> list[str]:
    """``flwr run``'s ``--run-config`` argument for this study and run directory (and the
    consortium folder whose enrolment list names the hospitals)."""
    values = {STUDY_KEY: str(Path(study).resolve()), RUN_DIR_KEY: str(Path(run_dir).resolve())}
    if consortium is not None:
        values[CONSORTIUM_KEY] = str(Path(consortium).resolve())
    return ["--run-config", " ".join(f'{k}="{v}"' for k, v in values.items())]


def enrolled_names(folder: Path) -> Callable[[int], str | None]:
    """node id -> the name its hospital was enrolled under, from the consortium folder's
    enrolment list (which ``server.daemon`` keeps in step with the SuperLink's registry).
    The list is read again when a node id is not on it (a hospital registered mid-run)."""
    from server.consortium import load_enrolments

    names: dict[int, str] = {}
    looked_up: set[int] = set()  # ids the list was read again for (once each)

    def read() -> None:
        names.clear()
        for entry in load_enrolments(folder):
            if entry.active and entry.node_id.isdigit():
                names[int(entry.node_id)] = entry.name

    def name_of(node_id: int) -> str | None:
        if node_id not in names and node_id not in looked_up:
            looked_up.add(node_id)
            try:
                read()
            except (OSError, ValueError) as err:  # a list being rewritten: ids for now
                logger.warning("cannot read the enrolment list in %s (%s)", folder, err)
        return names.get(node_id)

    return name_of


def revocations(folder: Path) -> Callable[[int], tuple[str, str] | None]:
    """node id -> ``(name, revoked_at)`` of its revoked enrolment in the consortium folder's
    list, else None; read when asked (only for a failed reply)."""
    from server.consortium import load_enrolments

    def revoked(node_id: int) -> tuple[str, str] | None:
        try:
            entries = load_enrolments(folder)
        except (OSError, ValueError) as err:  # a list being rewritten: the plain error
            logger.warning("cannot read the enrolment list in %s (%s)", folder, err)
            return None
        for entry in entries:
            if not entry.active and entry.node_id == str(node_id):
                return entry.name, entry.revoked_at
        return None

    return revoked


def load_study(study: Path) -> Study:
    """The study's resolved settings (weights and initial adapter pinned).

    Raises:
        core.settings.SettingsError: the study file is unreadable or refuses a setting.
    """
    from server.study import load_study as read_study
    from server.study import resolve_study

    return resolve_study(read_study(Path(study)))


def deployment_server_run(context: Context) -> ServerRun:
    """The :class:`ServerRun` named by the run config's ``study`` and ``run-dir``.

    Raises:
        ValueError: a run-config key is missing or empty.
    """
    from server.evaluation import coordinator_test_set, describe_test_set
    from server.records import RunRecords
    from server.simulation_app import ServerRun

    paths = {}
    for key in (STUDY_KEY, RUN_DIR_KEY):
        value = str(context.run_config.get(key, ""))
        if not value:
            raise ValueError(f"the run config lacks '{key}': submit the run with "
                             f"'medfed coordinator start DIR --study FILE'")
        paths[key] = Path(value)
    study = load_study(paths[STUDY_KEY])
    records = RunRecords(paths[RUN_DIR_KEY])
    if consortium := str(context.run_config.get(CONSORTIUM_KEY, "")):
        records.enrolled_name = enrolled_names(Path(consortium))
        records.revoked = revocations(Path(consortium))
    records.write_config(asdict(study))
    # The study's own test set, if it names one; otherwise the coordinator reads no data.
    held = coordinator_test_set(study)
    test_set = None
    if held is not None:
        test_set, report = held
        records.test_set = describe_test_set(report)
        logger.info("coordinator test set %s: %d of %d rows, images per class %s",
                    report.manifest, report.usable_rows, report.rows, report.images)

    def on_round(server_round: int, metrics: dict[str, float]) -> None:
        logger.info("round %d of %d: %s", server_round, study.federation.rounds,
                    {k: round(float(v), 4) for k, v in metrics.items()})

    return ServerRun(study=study, records=records, test_set=test_set, on_round=on_round)


def _log_to_stderr() -> None:
    """medfed's INFO logs on stderr (the coordinator's log); flwr-serverapp sets up only
    Flower's logger, and the root logger would repeat Flower's and httpx's lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("server", "strategies"):
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(logging.INFO)
            named.propagate = False


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from server.rounds import run_study_rounds, run_summary
    from server.serverapp_process import stop_with_coordinator, wait_for_hospitals
    from server.wire_grid import PackedWireGrid

    _log_to_stderr()
    stop_with_coordinator()
    run = deployment_server_run(context)
    federation = run.study.federation
    logger.info("study %s: %d rounds with at least %d hospitals, records in %s",
                context.run_config[STUDY_KEY], federation.rounds, federation.min_hospitals,
                run.records.run_dir)
    wait_for_hospitals(grid)
    started = time.monotonic()
    # Deployment only: packed adapters and prompt polling (server.wire_grid).
    # Every hospital dry-runs the study against its own policies first (server.preflight).
    outcome = run_study_rounds(PackedWireGrid(grid), run.study, run.records, run.test_set,
                               on_round=run.on_round, on_reply=run.on_reply, study_check=True)
    summary = run_summary(run.records, run.study, outcome)
    summary["wall_time_s"] = {"federated": time.monotonic() - started,
                              "rounds": outcome.wall_time_s}
    run.records.write_summary(summary)
    logger.info("finished: adapter in %s", run.records.run_dir / "adapter")
