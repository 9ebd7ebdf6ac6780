"""A hospital enrolled while its study runs takes part in that run (late joiners).

Real processes on loopback: the coordinator starts a 3-hospital study whose round needs all
three (``min_hospitals = 3``) with only two enrolled; the third is enrolled with
``medfed coordinator enroll`` while the coordinator runs, which syncs the running SuperLink's
registry, and its daemon then connects and trains in round 1 of the run it joined. Without
the sync the SuperLink refuses the new key until something else re-syncs its registry (the
daemon stops as refused, and the run waits for a hospital that cannot connect).
"""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import TIMEOUT_S, wait_for

from faults.harness import consortium, log_has, tiny_study
from medfed_cli.main import main as medfed
from server.consortium import load_enrolments
from server.daemon import coordinator_running

pytestmark = pytest.mark.slow


def test_a_hospital_enrolled_during_a_run_trains_in_it(tmp_path):
    study = tiny_study(hospitals=3, rounds=1, min_hospitals=3)
    with consortium(tmp_path, study, enrolled=2) as lc:
        assert [e.name for e in load_enrolments(lc.folder)] == ["hospital-0", "hospital-1"]
        coordinator = lc.start_coordinator()
        wait_for(log_has(lc, "coordinator", "registered hospital-1"), "the coordinator's "
                 "registry sync", alive=coordinator, log=lc.log("coordinator"))
        for k in (0, 1):
            lc.start_hospital(k)
        wait_for(lambda: coordinator_running(lc.folder), "the coordinator's pid file",
                 alive=coordinator, log=lc.log("coordinator"))
        # The late joiner: enrolled while the run waits for its third hospital.
        assert medfed(["coordinator", "enroll", str(lc.folder), "--name", "hospital-2",
                       "--hospital-key", str(lc.sites[2] / "node.pub")]) == 0
        assert load_enrolments(lc.folder)[-1].node_id  # registered with the running SuperLink
        lc.start_hospital(2)
        code = coordinator.wait(timeout=TIMEOUT_S)
        log = lc.log("coordinator").read_text(errors="replace")
        assert code == 0, log[-4000:]
        metrics = pd.read_csv(lc.run_dir / "metrics.csv", dtype={"hospital": str})
        trained = metrics[(metrics["round"] == 1) & metrics.train_loss.notna()]
        names = {e.node_id: e.name for e in load_enrolments(lc.folder)}
        assert {names.get(h, h) for h in trained.hospital} == {"hospital-0", "hospital-1",
                                                                "hospital-2"}
