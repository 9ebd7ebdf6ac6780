"""The dp-utility bench's closing lines: mean (min-max) over DP noise draws."""

from __future__ import annotations

from types import SimpleNamespace

from simulations.bench.dp_utility import _draw_dir, _headline


def test_headline_gives_each_epsilons_drop_over_the_draws_and_the_attack(capsys, tmp_path):
    attack = SimpleNamespace(auc=0.52)
    runs = {None: [{"auc": 0.96, "val_auc": 0.98}],
            8.0: [{"auc": 0.95, "val_auc": 0.97, "mia": attack},
                  {"auc": 0.94, "val_auc": 0.96, "mia": SimpleNamespace(auc=0.54)}],
            2.0: [{"auc": 0.93, "val_auc": 0.95}]}
    _headline(runs, validation=False)
    assert capsys.readouterr().out.splitlines() == [
        "federated auc, no dp: 0.9600 (0.9600-0.9600)",
        "auc drop at eps=8: 0.0150 (0.0100-0.0200)",
        "auc drop at eps=2: 0.0300 (0.0300-0.0300)",
        "membership auc at eps=8: 0.530",
    ]
    _headline(runs, validation=True)  # choices: validation figures only
    out = capsys.readouterr().out
    assert "federated validation auc, no dp: 0.9800" in out
    assert "validation auc drop at eps=8: 0.0150 (0.0100-0.0200)" in out
    assert [_draw_dir(tmp_path, e, d).name for e, d in ((None, 0), (8.0, 0), (8.0, 2))] == [
        "nodp", "eps8", "eps8-d3"]
