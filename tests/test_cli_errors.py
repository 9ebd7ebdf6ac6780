"""How an error reaches the user (issue #37, item 4): every medfed exception derives from
``MedfedError``; the command line prints one as a single line naming the file or field (its
traceback only with ``--verbose``), and any other exception keeps its traceback."""

from __future__ import annotations

import ast
import builtins
import importlib.util
from pathlib import Path

import pytest

from core.errors import MedfedError
from medfed_cli.main import main as medfed

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path: Path, layer: str) -> tuple[list[str], str]:
    """A command that fails in ``layer`` on a bad file in ``tmp_path``: (argv, what the one
    line must name)."""
    bad = tmp_path / "bad"
    if layer == "models":  # a study setting out of range (core.settings.SettingsError)
        bad.write_text('classes = ["normal", "pneumonia"]\n[model]\nlora_r = 0\n')
        return ["study", "check", str(bad)], "model.lora_r = 0"
    if layer == "imaging":  # a manifest without its columns (imaging.problems.ManifestError)
        bad.write_text("path,label\n")
        return ["hospital", "check", "--manifest", str(bad)], "['patient_id']"
    if layer == "client":  # no hospital.toml (client.site_folder.SiteFolderError)
        bad.mkdir()
        return ["hospital", "start", "--dir", str(bad)], str(bad / "hospital.toml")
    if layer == "server":  # no coordinator.toml (server.consortium.ConsortiumError)
        bad.mkdir()
        return ["coordinator", "hospitals", str(bad)], "coordinator.toml"
    if layer == "privacy":  # a ledger without its anchor (privacy.ledger.LedgerIntegrityError)
        bad.write_text("not a ledger")
        return ["hospital", "ledger", "--db", str(bad)], f"{bad}.anchor"
    if layer == "simulations":  # not a run directory (simulations.report.ReportError)
        return ["report", str(bad)], "not a finished run directory"
    assert layer == "inference"  # no adapter card (models.card.CardError via inference)
    bad.mkdir()
    return ["predict", str(bad), "--input", str(tmp_path)], "no card.json"


LAYERS = ("models", "imaging", "client", "server", "privacy", "simulations", "inference")


@pytest.mark.parametrize("layer", LAYERS)
def test_an_error_from_each_layer_is_one_line_naming_the_file_or_field(layer, tmp_path,
                                                                        capsys):
    argv, named = _setup(tmp_path, layer)
    code = medfed(argv)
    out, err = capsys.readouterr()
    # hospital check answers 1 for "not ready", so its own error status is 2.
    assert code == (2 if argv[:2] == ["hospital", "check"] else 1)
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], out
    assert "Traceback" not in out + err


def test_verbose_shows_the_traceback_above_the_line(tmp_path, capsys):
    argv, named = _setup(tmp_path, "simulations")
    assert medfed(["--verbose", *argv]) == 1
    out, err = capsys.readouterr()
    assert "Traceback (most recent call last)" in err and "ReportError" in err
    assert any(line.startswith("error:") and named in line for line in out.splitlines())


@pytest.mark.parametrize("bug", [ValueError("a bug's message"), KeyError("a bug's key")])
def test_an_exception_that_is_not_medfeds_keeps_its_traceback(bug, monkeypatch, capsys):
    """A plain ValueError is a bug, not a user's mistake: it is raised on, not printed."""
    import medfed_cli.study

    def broken(args):
        raise bug

    monkeypatch.setattr(medfed_cli.study, "cmd_study_check", broken)
    with pytest.raises(type(bug)):
        medfed(["study", "check", "any.toml"])
    assert "error:" not in capsys.readouterr().out


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys):
    assert medfed(["study", "check", str(tmp_path / "nothere.toml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error:") and "nothere.toml" in out and len(out.splitlines()) == 1


def _product_files() -> list[Path]:
    """Every product ``.py`` file (the packages ``scripts/long_functions.py`` checks)."""
    spec = importlib.util.spec_from_file_location("long_functions",
                                                  ROOT / "scripts" / "long_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(p for package in module.PACKAGES for p in (ROOT / package).rglob("*.py"))


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    """(file, class, base names) of every class in product code that derives from a built-in
    exception or another class named like an error."""
    builtin = {name for name, value in vars(builtins).items()
               if isinstance(value, type) and issubclass(value, BaseException)}
    found = []
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
            if any(b in builtin or b.endswith(("Error", "Refusal")) for b in bases):
                found.append((str(path.relative_to(ROOT)), node.name, bases))
    return found


def test_every_public_medfed_exception_derives_from_medfed_error():
    """Private control-flow exceptions (a leading underscore) are never shown to anyone."""
    import importlib

    classes = [c for c in _exception_classes() if not c[1].startswith("_")]
    assert len(classes) > 20  # the scan sees the product's exception classes
    for file, name, _ in classes:
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        assert issubclass(getattr(module, name), MedfedError), f"{file}: {name}"
