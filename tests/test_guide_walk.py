"""The hospital and coordinator guides, walked as written (issue #34, item 7).

Every ``$`` command of the guides' walked sections runs in order on a fresh folder with real
DICOM files, including the study itself (a coordinator and three hospital daemons over TLS on
loopback); each must exit as the guide shows and print the lines it shows. A guide that drifts
from the code fails here, naming the guide's line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.bench.guide_walk import (
    Edit,
    Step,
    guide_steps,
    missing_line,
    walk_guides,
    walk_steps,
)


def test_the_walk_reads_every_command_edit_and_status_from_the_guides():
    steps = walk_steps()
    commands = [s.command for s in steps if isinstance(s, Step)]
    assert commands[0].startswith("medfed coordinator init")
    assert any(c.startswith("medfed hospital check") and "--study" in c for c in commands)
    assert any("coordinator start" in c and "--study" in c for c in commands)
    # The shown failures carry their status (the guide's 'echo $?').
    assert {s.status for s in steps if isinstance(s, Step)} >= {0, 1, 2}
    edits = {s.path for s in steps if isinstance(s, Edit)}
    assert {"site-a/run-policy.toml", "site-a/hospital.toml", "study.toml"} <= edits
    with pytest.raises(ValueError, match="no section '## 99.'"):
        guide_steps("hospital", 99)


def test_a_shown_line_is_looked_for_in_order_with_placeholders():
    roots = (("/tmp/walk", "ROOT"), ("/tmp/guide", "ROOT"))
    printed = "rows: 41, usable: 41\nready: all 41 rows usable in /tmp/walk/site-a\n"
    assert missing_line(["rows: 40, usable: 40", "...", "ready: all 40 rows usable in "
                         "/tmp/guide/site-a"], printed, roots) == ""
    assert missing_line(["ready: all 40 rows usable in /tmp/guide/site-a", "rows: 40, usable: 40"],
                        printed, roots) == "rows: 40, usable: 40"
    assert missing_line(["NOT READY"], printed, roots) == "NOT READY"
    # A number is a number whatever its digits; a hash is a hash.
    assert missing_line(["1,hospital-a,9375085815067421542,0.5,be0a79faaed4dd1b"],
                        "1,hospital-a,14331970945522690062,0.33966782901968273,0afba9e763bc4e",
                        roots) == ""


@pytest.mark.slow
def test_the_guides_commands_run_as_written(tmp_path: Path):
    outcomes = walk_guides(tmp_path / "guide")
    failed = [f"{o.step.guide}-guide.md:{o.step.line}: {o.command}: {o.problem}\n"
              f"{o.output[-1500:]}" for o in outcomes if o.problem]
    assert not failed, "\n\n".join(failed)
    # The study ran and published: the walk reached the report and the audit logs.
    assert (tmp_path / "guide/consortium/runs/study/adapter/card.json").is_file()
    assert len(outcomes) >= 30
