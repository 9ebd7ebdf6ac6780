"""Walk the hospital and coordinator guides as written: every ``$`` command they show, in order,
on a fresh folder with real DICOM files, on one machine (loopback).

The guides are the source: :func:`guide_steps` reads the ``console`` blocks of
``docs/hospital-guide.md`` and ``docs/coordinator-guide.md`` (a line starting with ``$ `` is a
command, the lines after it up to the next command are what the guide shows it printing). The
walk interleaves their sections as a consortium lives them (:data:`WALK`) and runs each command
with ``bash`` in the demo folder, where the previous command left the shell (a ``cd`` holds).
What the guides say in words but do not show as a command is marked in the guide itself by an
HTML comment before the block, so that it too comes from the guide:

- ``<!-- walk: merge FILE -->`` before a ``toml`` block: its keys are set in ``FILE`` (an
  edit a hospital makes by hand);
- ``<!-- walk: write FILE -->`` before a block: ``FILE`` is written with its text;
- ``<!-- walk: every hospital -->`` before a ``console`` block: its commands (written for
  ``site-a``/``hospital-a``/``dicom-0``) run for each of the demo's three hospitals.

A step fails when its exit status differs from the one the guide shows (a ``$ echo $?`` after
it; 0 when there is none), or when a line the guide shows is not printed, in order (paths,
numbers, hashes and log timestamps are compared as placeholders; ``...`` skips lines).
``medfed coordinator start ... --study`` runs the study: the coordinator in the background,
then every hospital's daemon (the guide's ``medfed hospital start`` command without
``--print-command``), until the coordinator exits.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from simulations.processes import free_port, stop_process_group

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[2] / "docs"
WALK = (("coordinator", 1), ("hospital", 1), ("coordinator", 2), ("hospital", 2),
        ("hospital", 3), ("hospital", 4), ("coordinator", 3), ("hospital", 5),
        ("hospital", 6), ("coordinator", 4), ("coordinator", 5), ("coordinator", 6),
        ("hospital", 7))
"""(guide, section number) in the order a first study lives them; sections of the guides that
are not listed (the coordinator's test set, revocation) are not walked."""
HOSPITALS = (("a", 0), ("b", 1), ("c", 2))
"""The demo's hospitals: site-<letter>, hospital-<letter>, dicom-<index>."""
DEMO_PORTS = ("9300", "9094")
"""The coordinator's port and hospital A's runtime port in the guides: the walk replaces them
with free ports (one runtime port per hospital: the demo's hospitals share one machine)."""
STEP_TIMEOUT_S = 300.0
STUDY_TIMEOUT_S = 1800.0


@dataclass
class Step:
    """One command of a guide.

    Attributes:
        guide: ``hospital`` or ``coordinator``.
        line: the command's line number in the guide (1-based).
        command: the command as written (after ``$ ``).
        shown: the lines the guide shows it printing.
        status: the exit status the guide shows (its next command is ``echo $?``), else 0.
        every_hospital: run once per demo hospital.
    """

    guide: str
    line: int
    command: str
    shown: list[str] = field(default_factory=list)
    status: int = 0
    every_hospital: bool = False


@dataclass
class Edit:
    """A file the guide asks the reader to write (``write``) or to set keys in (``merge``)."""

    guide: str
    line: int
    action: str
    path: str
    text: str


@dataclass
class Outcome:
    """What one step did: ``problem`` is empty when it did what the guide shows."""

    step: Step
    command: str
    status: int
    output: str
    problem: str = ""


_SECTION = re.compile(r"^## (\d+)\.")
_MARK = re.compile(r"^<!-- walk: (merge|write) (\S+) -->$|^<!-- walk: (every hospital) -->$")


def _sections(path: Path) -> dict[int, list[tuple[int, str]]]:
    """Numbered ``## N.`` sections of a guide: N -> its (line number, text) pairs."""
    sections: dict[int, list[tuple[int, str]]] = {}
    current: list[tuple[int, str]] | None = None
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        heading = _SECTION.match(text)
        if heading:
            current = sections.setdefault(int(heading.group(1)), [])
        elif text.startswith("## "):
            current = None
        if current is not None:
            current.append((number, text))
    return sections


def _console_steps(guide: str, block: list[tuple[int, str]], every: bool) -> list[Step]:
    steps: list[Step] = []
    for number, text in block:
        if text.startswith("$ "):
            command = text[2:].strip()
            if command == "echo $?" and steps:
                steps[-1].status = -1  # filled from the shown line below
                continue
            steps.append(Step(guide, number, command, every_hospital=every))
        elif steps and steps[-1].status == -1:
            steps[-1].status = int(text.strip())
        elif steps:
            steps[-1].shown.append(text)
    return steps


def guide_steps(guide: str, section: int, docs: Path = DOCS) -> list[Step | Edit]:
    """The commands and edits of one section of ``docs/<guide>-guide.md``, in order."""
    lines = _sections(docs / f"{guide}-guide.md").get(section)
    if lines is None:
        raise ValueError(f"docs/{guide}-guide.md has no section '## {section}.'")
    out: list[Step | Edit] = []
    mark: re.Match[str] | None = None
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for number, text in lines:
        if fence is None and text.startswith("```"):
            fence, block = text[3:].strip(), []
        elif fence is not None and text.startswith("```"):
            if mark and mark.group(1):
                out.append(Edit(guide, block[0][0] if block else number, mark.group(1),
                                mark.group(2), "\n".join(t for _, t in block) + "\n"))
            elif fence == "console":
                out.extend(_console_steps(guide, block, bool(mark and mark.group(3))))
            fence, mark = None, None
        elif fence is not None:
            block.append((number, text))
        elif text.strip():
            mark = _MARK.match(text.strip())
    return out


def walk_steps(docs: Path = DOCS) -> list[Step | Edit]:
    """Every step of the walk (:data:`WALK`), in order."""
    return [step for guide, section in WALK for step in guide_steps(guide, section, docs)]


def for_hospital(text: str, letter: str, index: int) -> str:
    """``text`` written for hospital A (``site-a``, ``hospital-a``, ``dicom-0``) for another."""
    return (text.replace("site-a", f"site-{letter}").replace("hospital-a", f"hospital-{letter}")
            .replace("dicom-0", f"dicom-{index}"))


_TIMESTAMP = re.compile(r"\[\d\d/\d\d/\d\d \d\d:\d\d:\d\d\]")
_HEX = re.compile(r"\b(?=[0-9]*[a-f])[0-9a-f]{8,}\b")  # a hash (has a letter), not a number
_PYTHON = re.compile(r"\bpython3(\.\d+)?\b")
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")


def normalise(line: str, roots: tuple[tuple[str, str], ...]) -> str:
    """``line`` with the demo folder and the virtual environment (``roots``: text, placeholder),
    log timestamps, hashes and numbers as placeholders and runs of spaces as one."""
    for root, placeholder in roots:
        line = line.replace(root, placeholder)
    line = _PYTHON.sub("python", line)  # python, python3 or python3.11: the same interpreter
    line = _NUMBER.sub("N", _HEX.sub("H", _TIMESTAMP.sub("", line)))
    return " ".join(line.split())


def missing_line(shown: list[str], output: str, roots: tuple[tuple[str, str], ...]) -> str:
    """The first line the guide shows that the output lacks (in order), or ``""``."""
    printed = [normalise(line, roots) for line in output.splitlines()]
    at = 0
    for line in shown:
        want = normalise(line, roots)
        if not want or want == "...":
            continue
        while at < len(printed) and want not in printed[at]:
            at += 1
        if at == len(printed):
            return line
        at += 1
    return ""


class Walk:
    """The demo folder and the shell state: where the last command of each guide left its
    shell (the hospital and the coordinator work in shells of their own) and the last status."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.cwds = {"hospital": root, "coordinator": root}
        self.guide = "hospital"
        self.last_status = 0
        self.ports = [(DEMO_PORTS[0], str(free_port()))]
        self.runtime_ports = [str(free_port()) for _ in HOSPITALS]
        self.env = env
        # The guides' demo folder and virtual environment, and this walk's.
        self.roots = ((str(root), "ROOT"), ("/tmp/guide", "ROOT"),
                      (str(Path(sys.executable).parent), "BIN"), ("/work/main/.venv/bin", "BIN"))

    def localise(self, text: str, hospital: int = 0) -> str:
        """``text`` of the guide for demo hospital ``hospital`` (0: as written), with this
        walk's ports."""
        letter, index = HOSPITALS[hospital]
        text = for_hospital(text, letter, index) if hospital else text
        text = text.replace(DEMO_PORTS[1], self.runtime_ports[hospital])
        for demo, port in self.ports:
            text = text.replace(demo, port)
        return text

    @property
    def cwd(self) -> Path:
        return self.cwds[self.guide]

    def shell(self, command: str, timeout_s: float = STEP_TIMEOUT_S) -> tuple[int, str]:
        """Run ``command`` with bash where the last one left the shell; track ``cd``."""
        where = self.root / ".walk-cwd"
        script = (f"cd {self.cwd} && (exit {self.last_status}); {command}\n"
                  f"status=$?; pwd > {where}; exit $status")
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                              env=self.env, timeout=timeout_s)
        if where.exists():
            self.cwds[self.guide] = Path(where.read_text().strip())
        self.last_status = done.returncode
        return done.returncode, done.stdout + done.stderr

    def edit(self, edit: Edit) -> None:
        """Apply a guide's ``write`` or ``merge`` (for each hospital when it names site-a)."""
        hospitals = range(len(HOSPITALS)) if "site-a" in edit.path else [0]
        for k in hospitals:
            path = self.cwd / for_hospital(edit.path, *HOSPITALS[k])
            text = self.localise(edit.text, k)
            if edit.action == "write":
                path.write_text(text)
                continue
            values = tomllib.loads(path.read_text())
            for key, value in tomllib.loads(text).items():
                merged = values.get(key)
                values[key] = merged | value if isinstance(merged, dict) else value
            path.write_text(tomli_w.dumps(values))

    def run_study(self, command: str, start_hospital: str) -> tuple[int, str]:
        """The coordinator's ``start --study`` in the background, then each hospital's daemon;
        returns the coordinator's status and output once it exits."""
        log = self.root / "coordinator.log"
        with open(log, "w") as out:
            coordinator = subprocess.Popen(["bash", "-c", f"cd {self.cwd} && {command}"],
                                           stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True)
        daemons = []
        try:
            for k, (letter, _) in enumerate(HOSPITALS):
                with open(self.root / f"hospital-{letter}.log", "w") as out:
                    daemons.append(subprocess.Popen(
                        ["bash", "-c", f"cd {self.cwds['hospital']} && exec "
                                       f"{self.localise(start_hospital, k)}"],
                        stdout=out, stderr=subprocess.STDOUT, env=self.env,
                        start_new_session=True))
            status = coordinator.wait(timeout=STUDY_TIMEOUT_S)
        finally:
            for proc in [*daemons, coordinator]:
                stop_process_group(proc)
        self.last_status = status
        return status, log.read_text(errors="replace")

    def step(self, step: Step, start_hospital: str) -> list[Outcome]:
        """Run one guide command (once per hospital when marked so) and judge it."""
        commands = [self.localise(step.command, k)
                    for k in (range(len(HOSPITALS)) if step.every_hospital else [0])]
        outcomes = []
        for command in commands:
            if "coordinator start" in command and "--study" in command:
                status, output = self.run_study(command, start_hospital)
            else:
                status, output = self.shell(command)
            outcome = Outcome(step, command, status, output)
            shown = step.shown if command == commands[0] else []
            lacking = missing_line(shown, output, self.roots)
            if status != step.status:
                outcome.problem = f"exit status {status}, the guide shows {step.status}"
            elif lacking:
                outcome.problem = f"the guide shows {lacking.strip()!r}, not printed"
            outcomes.append(outcome)
        return outcomes


def daemon_command(steps: list[Step | Edit]) -> str:
    """The hospital guide's ``medfed hospital start ... --print-command`` without the flag."""
    for step in steps:
        if isinstance(step, Step) and step.command.startswith("medfed hospital start"):
            return step.command.replace(" --print-command", "")
    raise ValueError("docs/hospital-guide.md shows no 'medfed hospital start' command")


def prepare_demo(root: Path, images_per_hospital: int = 40, image_size: int = 32) -> None:
    """What the guides' demo starts from: ``dicom-0..2/`` (PneumoniaMNIST images written as
    DICOM files with a manifest, ``simulations.dicom_export``) and an empty ``empty-data/``."""
    from simulations.config import DataConfig
    from simulations.dicom_export import export_site
    from simulations.sites import hospital_site

    data = DataConfig(num_hospitals=len(HOSPITALS), partition="iid", val_fraction=0.3,
                      max_train_examples=len(HOSPITALS) * images_per_hospital)
    for _, k in HOSPITALS:
        export_site(hospital_site(data, image_size, 0, k), root / f"dicom-{k}", k,
                    ["normal", "pneumonia"])
    (root / "empty-data").mkdir(exist_ok=True)


def walk_guides(root: Path, docs: Path = DOCS) -> list[Outcome]:
    """Prepare the demo under ``root`` (empty) and walk the guides there; one outcome per
    command run (a command marked ``every hospital`` gives three)."""
    root = Path(root).resolve()
    prepare_demo(root)
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_HOME=str(root / ".flwr"), COLUMNS="1000", PYTHONUNBUFFERED="1")
    walk = Walk(root, env)
    steps = walk_steps(docs)
    start_hospital = daemon_command(steps)
    outcomes: list[Outcome] = []
    for step in steps:
        walk.guide = step.guide
        if isinstance(step, Edit):
            walk.edit(step)
            continue
        for outcome in walk.step(step, start_hospital):
            logger.info("%s-guide:%d %s -> %d%s", step.guide, step.line, outcome.command,
                        outcome.status, f" FAILED: {outcome.problem}" if outcome.problem else "")
            outcomes.append(outcome)
    return outcomes
