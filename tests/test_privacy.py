"""Differential privacy: accounting against Google's dp-accounting, DP-SGD on real data, update DP,
the hospital's ledger (atomic, budget-refusing) and the coordinator's records of epsilon."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, RecordDict
from opacus import PrivacyEngine
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch.utils.data import DataLoader, TensorDataset

from client.app import build_client_app
from client.privacy_round import REFUSAL_CODE, SitePrivacy, plan_charges
from client.site import SiteData
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model, freeze_batchnorm
from privacy.accounting import PRV_MIN_NOISE, epsilon, noise_for_target
from privacy.augmult import average_view_gradients, shifted_views
from privacy.config import DPConfig, dp_config_from_record
from privacy.dpsgd import make_optimizer, plan_round, train_dpsgd
from privacy.grad_samplers import conv2d_grad_sample, engine_module
from privacy.ledger import BudgetExceeded, Charge, Ledger
from privacy.noise import SecureNoise
from privacy.policy import SitePolicy, load_site_policy
from privacy.update_dp import clip_and_noise, update_norm
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import FederationError, run_federation
from simulations.baselines import local_baseline, pooled_baseline
from simulations.inprocess import InProcessGrid, coordinator_message
from strategies.replies import Reply


def reference_epsilon(events, delta: float, accountant: str) -> float:
    """Google's dp-accounting on the same Poisson-subsampled Gaussian events (RDP; PLD for PRV)."""
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    for z, q, steps in events:
        acc.compose(dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("events", [
    [(1.1, 0.01, 1000)],
    [(0.9, 0.05, 40), (0.9, 0.05, 40), (2.0, 1.0, 1)],
])
def test_epsilon_matches_dp_accounting(events, accountant):
    ours = epsilon(events, 1e-5, accountant)
    assert ours == pytest.approx(reference_epsilon(events, 1e-5, accountant), rel=0.01)


def test_gaussian_mechanism_closed_form():
    """One full-batch Gaussian release: the RDP curve is alpha / (2 z^2); epsilon is its
    conversion min over alpha (opacus' improved conversion), checked against dp-accounting's
    RDP and against the analytic Gaussian mechanism (Balle & Wang 2018) as a lower bound."""
    z, delta = 2.0, 1e-5
    eps = epsilon([(z, 1.0, 1)], delta, "rdp")
    assert eps == pytest.approx(reference_epsilon([(z, 1.0, 1)], delta, "rdp"), rel=0.01)
    exact = dpa.pld.PLDAccountant().compose(dpa.GaussianDpEvent(z)).get_epsilon(delta)
    assert exact <= eps <= 1.5 * exact


def test_noise_for_target_reaches_the_target():
    q, steps = 32 / 1000, 300
    z = noise_for_target(3.0, 1e-5, q, steps, "rdp")
    assert reference_epsilon([(z, q, steps)], 1e-5, "rdp") == pytest.approx(3.0, rel=0.01)


def test_prv_below_its_noise_floor_answers_with_rdp_bounds():
    """A nearly noiseless round once took PRV past 23 GB (the hospital was killed); now the RDP
    accountant answers (an upper bound of PRV's epsilon), checked against dp-accounting's RDP."""
    events = [(0.05, 0.023, 352)]
    eps = epsilon(events, 1e-5, "prv")
    assert eps == pytest.approx(reference_epsilon(events, 1e-5, "rdp"), rel=0.01)
    q, steps = 64 / 2775, 352
    z = noise_for_target(1000.0, 1e-5, q, steps, "prv")
    assert z < 2 * PRV_MIN_NOISE
    assert reference_epsilon([(z, q, steps)], 1e-5, "rdp") <= 1000.0 * 1.01


def test_dp_config_travels_in_the_config_record():
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.3, dp_accountant="prv", update_clip_norm=0.5,
                  update_noise_multiplier=0.8, update_hospitals=4)
    assert dp_config_from_record(to_config_record(TrainConfig(), dp)) == dp
    assert dp_config_from_record(to_config_record(TrainConfig())) == DPConfig()
    record = to_config_record(dp)
    del record["dp-delta"]
    with pytest.raises(KeyError, match="dp-delta"):
        dp_config_from_record(record)
    with pytest.raises(ValueError, match="dp_accountant"):
        DPConfig(dp_accountant="moments")


def test_dp_optimizer_takes_its_own_rate_with_the_runs_decay():
    """``dp_optimizer = "sgd"`` at ``dp_lr`` follows the run's per-round decay (round 2 at decay
    0.5 halves it); without ``dp_lr`` DP-SGD steps with AdamW at the round's train rate."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    train = TrainConfig(lr=2e-3, lr_decay=0.5)
    round_two = 1e-3
    sgd = make_optimizer(params, train, DPConfig(dp_optimizer="sgd", dp_lr=0.4, dp_momentum=0.8),
                         lr=round_two)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.2)
    assert sgd.param_groups[0]["momentum"] == 0.8
    adam = make_optimizer(params, train, DPConfig(), lr=round_two)
    assert isinstance(adam, torch.optim.AdamW)
    assert adam.param_groups[0]["lr"] == pytest.approx(round_two)
    with pytest.raises(ValueError, match="dp_optimizer"):
        DPConfig(dp_optimizer="lbfgs")
    with pytest.raises(ValueError, match="dp_momentum"):
        DPConfig(dp_optimizer="sgd", dp_momentum=1.0)


def test_target_epsilon_sets_the_noise_for_the_whole_run():
    """With a target per run, the noise is derived so that all planned rounds together spend
    it (checked with dp-accounting), and a run that does not say its length is an error."""
    train = TrainConfig(local_epochs=2, batch_size=20)
    dp = DPConfig(dpsgd=True, dp_target_epsilon=3.0, dp_run_rounds=5)
    (charge,) = plan_charges(dp, 400, train)
    assert (charge.sample_rate, charge.steps) == (0.05, 40)
    run = [charge.event] * 5
    assert reference_epsilon(run, 1e-5, "rdp") == pytest.approx(3.0, rel=0.01)
    with pytest.raises(ValueError, match="dp_run_rounds"):
        plan_charges(DPConfig(dpsgd=True, dp_target_epsilon=3.0), 400, train)


# --- DP-SGD on real data --------------------------------------------------------------------


SITE = (64, 32, 1)  # the conftest ``site`` fixture: train, val images, seed


def test_dpsgd_trains_the_adapter_and_leaves_the_model_clean(site, small_model_config):
    torch.manual_seed(0)
    model = build_lora_model(small_model_config)
    before = adapter_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = TrainConfig(local_epochs=1, batch_size=16, lr=1e-2)
    result = train_dpsgd(model, site.train.images, site.train.labels, config,
                         DPConfig(dpsgd=True, dp_noise_multiplier=1.0), 1.0, seed=3)
    after = adapter_state(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "DP-SGD changed no adapter tensor"
    assert all(torch.isfinite(t).all() for t in after.values())
    assert result.plan == plan_round(len(site.train), config)
    # The frozen backbone is untouched.
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # opacus is gone afterwards: no hooks, no per-example gradients on the cached model.
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_baselines_of_a_dpsgd_run_train_with_dpsgd_at_its_epsilon(pneumonia_small,
                                                                    small_model_config):
    """In a DP-SGD run the pooled and local baselines run DP-SGD too, each data holder (the
    pooled data; each hospital alone) spending the run's target epsilon (checked with
    dp-accounting), so federated-vs-pooled compares like with like."""
    train_split, test_split = pneumonia_small.splits["train"], pneumonia_small.splits["test"]
    rng = np.random.default_rng(4)
    picks = rng.choice(len(train_split), 200, replace=False)
    sites = [SiteData(train=train_split.subset(picks[:130]), val=train_split.subset(picks[:8])),
             SiteData(train=train_split.subset(picks[130:]), val=train_split.subset(picks[:8]))]
    test = test_split.subset(rng.choice(len(test_split), 100, replace=False))
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
    dp = DPConfig(dpsgd=True, dp_target_epsilon=2.0, dp_accountant="rdp")
    rounds = 2

    plain = pooled_baseline(sites, test, small_model_config, train, rounds)
    private = pooled_baseline(sites, test, small_model_config, train, rounds, dp=dp)
    assert "dp_epsilon" not in plain
    assert private["auc"] != plain["auc"]
    plan = plan_round(200, train)
    noise = noise_for_target(2.0, dp.dp_delta, plan.sample_rate, plan.steps * rounds, "rdp")
    run = [(noise, plan.sample_rate, plan.steps)] * rounds
    assert private["dp_epsilon"] == pytest.approx(reference_epsilon(run, dp.dp_delta, "rdp"),
                                                  rel=0.01)
    assert private["dp_epsilon"] == pytest.approx(2.0, rel=0.01)

    local = local_baseline(sites, test, small_model_config, train, rounds, dp=dp)
    assert [h["dp_epsilon"] for h in local["per_hospital"]] == pytest.approx([2.0, 2.0], rel=0.01)
    assert local["dp_epsilon"] == max(h["dp_epsilon"] for h in local["per_hospital"])


def _message(arrays: ArrayRecord, config) -> Message:
    return coordinator_message("train", arrays, config, run_id=5)


def _wire(model_config, train: TrainConfig, dp: DPConfig, server_round: int):
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(model_config)))
    record = to_config_record(model_config, train, dp)
    record["server-round"] = server_round
    return arrays, record


def test_reported_epsilon_composes_over_rounds_and_matches_dp_accounting(
    site, small_model_config, tmp_path
):
    """Two rounds through the ClientApp: the reply's epsilon is this run's spend so far, kept in
    the hospital's context.state, and equals dp-accounting's on the same events within 1%."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = build_client_app(lambda context, image_size: site,
                           lambda context: SitePrivacy(ledger=ledger, dataset_id="site-a"))
    context = Context(run_id=5, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=0.9, dp_delta=1e-4)
    q, steps = 16 / len(site.train), 1 * int(len(site.train) / 16)
    reported = []
    for server_round in (1, 2):
        reply = app(_message(*_wire(small_model_config, train, dp, server_round)), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        reported.append(reply.content["metrics"]["dp-epsilon"])
        assert reply.content["metrics"]["dp-delta"] == 1e-4
    for rounds, eps in enumerate(reported, start=1):
        expected = reference_epsilon([(0.9, q, steps)] * rounds, 1e-4, "rdp")
        assert eps == pytest.approx(expected, rel=0.01)
    assert reported[1] > reported[0]
    rows = ledger.rows("site-a")
    assert [(r.run_id, r.server_round, r.mechanism, r.steps) for r in rows] == [
        ("5", 1, "dpsgd", steps), ("5", 2, "dpsgd", steps)]


def test_update_dp_reply_is_clipped_and_accounted(site, small_model_config):
    """Client-level DP through the ClientApp: the released adapter is within the clip bound of
    the global one (noise negligible here), asks for uniform averaging, and its epsilon is the
    Gaussian mechanism at the hospital's own noise share z / sqrt(n), per example (halved)."""
    app = build_client_app(lambda context, image_size: site, lambda context: SitePrivacy())
    context = Context(run_id=5, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-2)
    dp = DPConfig(update_clip_norm=0.01, update_noise_multiplier=1e-7, update_hospitals=4)
    arrays, config = _wire(small_model_config, train, dp, 1)
    reply = app(_message(arrays, config), context)
    assert not reply.has_error()
    new = reply.content["arrays"].to_torch_state_dict()
    assert update_norm(new, arrays.to_torch_state_dict()) == pytest.approx(0.01, rel=1e-3)
    metrics = reply.content["metrics"]
    assert metrics["update-weight"] == 1.0
    z = 3.0
    dp_big = DPConfig(update_clip_norm=0.01, update_noise_multiplier=z, update_hospitals=4)
    reply = app(_message(*_wire(small_model_config, train, dp_big, 2)), Context(
        run_id=6, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}))
    # The hospital's share z / sqrt(4) = z / 2, halved again per example (sensitivity 2C).
    expected = reference_epsilon([(z / 2 / 2, 1.0, 1)], 1e-5, "rdp")
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(expected, rel=0.01)


# --- the ledger and the site policy ---------------------------------------------------------


def _charge(z=1.0, q=0.1, steps=50) -> Charge:
    return Charge("dpsgd", z, q, steps, 1.0)


def test_ledger_composes_across_runs(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    total1 = ledger.record_round("d1", "run-1", 1, [_charge()], 1e-5, "rdp", budget=100)
    total2 = ledger.record_round("d1", "run-2", 1, [_charge(), Charge("client-gaussian", 2.0,
                                                                      1.0, 1, 0.5)],
                                 1e-5, "rdp", budget=100)
    ledger.record_round("d2", "run-2", 1, [_charge(z=5.0)], 1e-5, "rdp", budget=100)
    events = [(1.0, 0.1, 50), (1.0, 0.1, 50), (2.0, 1.0, 1)]
    assert total1 == pytest.approx(reference_epsilon(events[:1], 1e-5, "rdp"), rel=0.01)
    assert total2 == pytest.approx(reference_epsilon(events, 1e-5, "rdp"), rel=0.01)
    assert [r.epsilon_total for r in ledger.rows("d1")][-1] == total2
    assert len(ledger.rows()) == 4


def test_ledger_refuses_past_the_budget_and_records_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    # A budget between one round's epsilon and two rounds' epsilon.
    budget = (epsilon([(1.0, 0.1, 50)], 1e-5, "rdp") + epsilon([(1.0, 0.1, 50)] * 2, 1e-5)) / 2
    ledger.record_round("d", "r", 1, [_charge()], 1e-5, "rdp", budget=budget)
    with pytest.raises(BudgetExceeded, match="past the site budget"):
        ledger.record_round("d", "r", 2, [_charge()], 1e-5, "rdp", budget=budget)
    assert [r.server_round for r in ledger.rows("d")] == [1]


CRASH_MID_ROUND = """
import os, sys
from privacy.ledger import Charge, Ledger

insert, calls = Ledger._insert, []

def insert_then_maybe_die(conn, values):
    insert(conn, values)
    calls.append(1)
    if len(calls) == 2:
        os._exit(17)  # the process dies: no cleanup, no rollback

Ledger._insert = staticmethod(insert_then_maybe_die)
Ledger(sys.argv[1]).record_round(
    "d", "run", 2,
    [Charge("dpsgd", 1.0, 0.1, 50, 1.0), Charge("client-gaussian", 2.0, 1.0, 1, 1.0)],
    1e-5, "rdp", budget=100)
"""


def test_a_crash_mid_round_records_no_part_of_it(tmp_path):
    """A process that dies after writing the first of a round's two rows leaves no trace of the
    round; the ledger stays usable."""
    path = tmp_path / "l.sqlite"
    Ledger(path).record_round("d", "run", 1, [_charge()], 1e-5, "rdp", budget=100)
    child = subprocess.run([sys.executable, "-c", CRASH_MID_ROUND, str(path)],
                           cwd=Path(__file__).parents[1], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 17, f"the child did not crash where meant to: {child.stderr}"
    rows = Ledger(path).rows("d")
    assert [(r.server_round, r.mechanism) for r in rows] == [(1, "dpsgd")]
    # The ledger is usable after the crash (the hot journal was rolled back).
    Ledger(path).record_round("d", "run", 2, [_charge()], 1e-5, "rdp", budget=100)
    assert len(Ledger(path).rows("d")) == 2


def test_hospital_refuses_a_round_past_its_budget(site, small_model_config, tmp_path):
    """The site's budget affords one round: the second gets an error reply with the reason, and
    the ledger holds exactly the first."""
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0)
    q, steps = 16 / len(site.train), int(len(site.train) / 16)
    budget = (epsilon([(1.0, q, steps)], 1e-5) + epsilon([(1.0, q, steps)] * 2, 1e-5)) / 2
    ledger = Ledger(tmp_path / "ledger.sqlite")
    privacy = SitePrivacy(policy=SitePolicy(max_epsilon=budget), ledger=ledger,
                          dataset_id="site-b")
    app = build_client_app(lambda context, image_size: site, lambda context: privacy)
    context = Context(run_id=5, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    first = app(_message(*_wire(small_model_config, train, dp, 1)), context)
    assert not first.has_error()
    second = app(_message(*_wire(small_model_config, train, dp, 2)), context)
    assert second.has_error() and second.error.code == REFUSAL_CODE
    assert "past the site budget" in second.error.reason
    assert [r.server_round for r in ledger.rows("site-b")] == [1]
    # A round without DP is refused outright by a site with a budget.
    plain = app(_message(*_wire(small_model_config, train, DPConfig(), 3)), context)
    assert plain.has_error() and "without differential privacy" in plain.error.reason


def test_run_ends_at_the_round_refusals_leave_too_few_updates(site, small_model_config,
                                                              tmp_path):
    """Both hospitals' budgets afford one round: the run ends in round 2 with an error naming
    the refusals (not after round 3), and metrics.csv keeps what happened."""
    train = TrainConfig(local_epochs=1, batch_size=16, lr=1e-3)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0)
    q, steps = 16 / len(site.train), int(len(site.train) / 16)
    budget = (epsilon([(1.0, q, steps)], 1e-5) + epsilon([(1.0, q, steps)] * 2, 1e-5)) / 2

    def privacy(context: Context) -> SitePrivacy:
        return SitePrivacy(policy=SitePolicy(max_epsilon=budget), dataset_id="site",
                           ledger=Ledger(tmp_path / f"ledger-{context.node_id}.sqlite"))

    app = build_client_app(lambda context, image_size: site, privacy)
    grid = InProcessGrid(app, {1: {"partition-id": 0}, 2: {"partition-id": 1}})
    records = RunRecords(tmp_path / "run")
    federation = FederationConfig(rounds=3, min_hospitals=2, fraction_evaluate=0.0)
    with pytest.raises(FederationError, match=r"round 2 got 0 valid updates, needs 2;"
                                              r".*past the site budget") as caught:
        run_federation(grid, federation, small_model_config, train, site.val, records, dp=dp)
    assert caught.value.args[0].count("privacy budget") == 2
    assert {r["round"] for r in records.train_rows()} == {1, 2}
    assert (tmp_path / "run" / "metrics.csv").exists()


def test_site_policy_file_errors_name_the_setting(tmp_path):
    good = tmp_path / "policy.toml"
    good.write_text('max_epsilon = 8.0\ndelta = 1e-6\naccountant = "prv"\n')
    assert load_site_policy(good) == SitePolicy(max_epsilon=8.0, delta=1e-6, accountant="prv")
    bad = tmp_path / "bad.toml"
    bad.write_text("max_epsilon = 8.0\nmax_epsilom = 3\n")
    with pytest.raises(ValueError, match="max_epsilom"):
        load_site_policy(bad)
    bad.write_text("delta = 1e-5\n")
    with pytest.raises(ValueError, match="set max_epsilon"):
        load_site_policy(bad)
    bad.write_text('max_epsilon = "eight"\n')
    with pytest.raises(ValueError, match="max_epsilon"):
        load_site_policy(bad)


# --- client-level DP on updates -------------------------------------------------------------


def test_update_is_clipped_and_noise_shares_sum_to_the_calibrated_noise():
    ref = {"a": torch.zeros(200, 50), "b": torch.zeros(10)}
    new = {"a": torch.full((200, 50), 0.1), "b": torch.ones(10)}
    clipped = clip_and_noise(new, ref, 1.0, 0.0, 4, SecureNoise())
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-5)
    # Direction kept: clipping only scales.
    assert torch.allclose(clipped["b"] / clipped["b"].norm(), new["b"] / new["b"].norm())
    # n hospitals each add their share: the sum of the n noises has std z * C.
    z, clip, n = 2.0, 0.5, 4
    shares = [clip_and_noise(ref, ref, clip, z, n, SecureNoise())["a"] for _ in range(n)]
    total = torch.stack(shares).sum(0)
    assert float(total.std()) == pytest.approx(z * clip, rel=0.05)
    assert float(shares[0].std()) == pytest.approx(z * clip / math.sqrt(n), rel=0.05)


# --- the coordinator's records --------------------------------------------------------------


def test_coordinator_records_epsilon_per_hospital_and_round(tmp_path):
    records = RunRecords(tmp_path)
    for server_round, eps in ((1, 0.8), (2, 1.2)):
        records.add_reply(Reply(server_round, "train", node_id=11, metrics={
            "num-examples": 10, "train-loss": 0.5, "hospital-id": 0,
            "dp-epsilon": eps, "dp-delta": 1e-5}))
    records.add_reply(Reply(3, "train", node_id=11, error="hospital error: privacy budget: "
                            "this round would bring epsilon to 9, past the site budget 8"))
    text = records.write_metrics().read_text().splitlines()
    header = text[0].split(",")
    assert "epsilon" in header and "delta" in header
    rows = [dict(zip(header, line.split(","), strict=False)) for line in text[1:]]
    assert [r["epsilon"] for r in rows if r["hospital"] == "0"] == ["0.8", "1.2", ""]
    summary = records.privacy_summary()
    assert summary["epsilon_per_hospital"] == {"0": 1.2} and summary["delta"] == 1e-5
    # The refusal carries no metrics, yet lands on the hospital's line.
    assert summary["refusals"] == [{"round": 3, "hospital": "0", "reason": "train: hospital "
                                    "error: privacy budget: this round would bring epsilon to "
                                    "9, past the site budget 8"}]


def test_cli_shows_the_ledger(tmp_path, capsys):
    from medfed_cli import main as cli

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    for server_round in (1, 2):
        ledger.record_round("dataset-x", "run-7", server_round, [_charge()], 1e-5, "rdp", 8.0)
    total = epsilon([(1.0, 0.1, 50)] * 2, 1e-5)
    cli.console.width = 200
    assert cli.main(["hospital", "ledger", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run-7" in out and f"{total:.3f}" in out and f"{8.0 - total:.3f}" in out
    assert cli.main(["hospital", "ledger", "--db", str(tmp_path / "missing.sqlite")]) == 1


def _per_example_conv_grads(conv: torch.nn.Conv2d,
                            x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's gradient ``(B, *conv.weight.shape)`` of ``sum(conv(x_b) * w_b)``, one at a
    time, and the fixed random output weighting ``w`` (the backprops), seeded."""
    weights = torch.randn(conv(x).shape, generator=torch.Generator().manual_seed(1))
    return torch.stack([
        torch.autograd.grad((conv(x[b:b + 1]) * weights[b:b + 1]).sum(), conv.weight)[0]
        for b in range(len(x))
    ]), weights


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 1},  # LoRA's lora_A / lora_B on a pointwise conv: the bmm path
    {"kernel_size": 3, "stride": 2, "padding": 1, "groups": 2},  # opacus' unfold, made contiguous
])
def test_einsum_conv_sampler_is_exact_in_channels_last(kwargs):
    """The backbone runs channels-last; opacus 1.6's own Conv2d sampler (``unfold2d``'s
    ``as_strided`` assumes NCHW strides) is then wrong, ``privacy.grad_samplers``' is exact."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, bias=False, **kwargs)
    x = torch.randn(5, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    reference, backprops = _per_example_conv_grads(conv, x)
    backprops = backprops.contiguous(memory_format=torch.channels_last)

    def rel(got):
        return float((got - reference).norm() / reference.norm())

    assert rel(conv2d_grad_sample(conv, [x], backprops)[conv.weight]) < 1e-6
    assert rel(compute_conv_grad_sample(conv, [x], backprops)[conv.weight]) > 0.1


def _float64_model(model_config) -> torch.nn.Module:
    """A deterministic float64 LoRA model in training mode, ``lora_B`` off zero (so every LoRA
    factor has a gradient), dropout off, BatchNorm frozen."""
    torch.manual_seed(0)
    net = build_lora_model(model_config)
    for module in net.modules():
        if hasattr(module, "drop_connect_rate"):
            module.drop_connect_rate = 0.0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    net.double().train()
    freeze_batchnorm(net)
    return net


@pytest.mark.parametrize("mode, exact", [("einsum", True), ("functorch", True),
                                         ("hooks", False)])
def test_exact_engines_clip_per_example_gradients(site, small_model_config, mode, exact):
    """With zero noise, one DP-SGD step of an exact engine (the default ``einsum``,
    ``privacy.grad_samplers``; ``functorch``) yields the mean of per-example gradients each
    clipped as opacus clips (factor ``min(1, C / (norm + 1e-6))``), computed here one example
    at a time on real images with ``lora_B`` off zero (so every LoRA factor has a gradient),
    some examples clipped and some not. In float64, so that float32 rounding (batched and
    single-example convolutions sum in different orders, about 1e-7 to 1e-6 relative here)
    cannot hide an error: they agree to 1e-10. opacus' own ``hooks`` engine is far off on this
    channels-last backbone (why ``einsum`` exists), and medfed refuses to run it there."""
    images, labels, clip = site.train.images[:8].double(), site.train.labels[:8], 7.0
    net = _float64_model(small_model_config)
    params = [p for p in net.parameters() if p.requires_grad]
    reference = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    clipped = 0
    for i in range(len(labels)):
        grads = torch.autograd.grad(F.cross_entropy(net(images[i:i + 1]), labels[i:i + 1]),
                                    params)
        flat = torch.cat([g.flatten() for g in grads])
        norm = float(flat.norm())
        clipped += norm > clip
        reference += flat * min(1.0, clip / (norm + 1e-6))
    reference /= len(labels)
    # Per-example norms here are about 3.7 to 10: both branches of the clipping are taken.
    assert 0 < clipped < len(labels)

    net = _float64_model(small_model_config)
    if exact:
        module, opacus_mode = engine_module(net, mode)
    else:  # medfed refuses it; opacus itself runs it
        module, opacus_mode = net, mode
        with pytest.raises(ValueError, match="channels-last"):
            engine_module(net, mode)
    got = _zero_noise_step(net, module, opacus_mode, images, labels, clip)
    error = float((got - reference).norm() / reference.norm())
    assert error < 1e-10 if exact else error > 0.1


def _zero_noise_step(net: torch.nn.Module, module: torch.nn.Module, opacus_mode: str,
                     images: torch.Tensor, labels: torch.Tensor, clip: float,
                     views: int = 1) -> torch.Tensor:
    """One opacus step without noise on the whole batch (``images`` holds ``views`` rows per
    example, example-major); returns the flat gradient the optimiser was given."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    batch = len(labels) // views
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, _ = PrivacyEngine().make_private(
            module=module, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=clip,
            data_loader=DataLoader(TensorDataset(images[:batch], labels[:batch]),
                                   batch_size=batch),
            poisson_sampling=False, grad_sample_mode=opacus_mode)
        private.train()
        freeze_batchnorm(private)
        F.cross_entropy(private(images), labels).backward()
        if views > 1:
            average_view_gradients(params, views)
        optimizer.step()
    private._close()
    return torch.cat([p.grad.flatten() for p in params])


def test_augmentation_multiplicity_clips_each_examples_mean_over_its_views(site,
                                                                          small_model_config):
    """With zero noise, a DP-SGD step on ``k`` shifted views per example (``privacy.augmult``)
    yields the mean over examples of the *clipped mean of each example's views' gradients*
    (De et al. 2022), computed here one example at a time; clipping each view on its own, or
    the views as separate examples, gives another result. Real images, float64."""
    views, clip = 3, 7.0
    images, labels = site.train.images[:6].double(), site.train.labels[:6]
    inputs = shifted_views(images, views, torch.Generator().manual_seed(5))
    assert inputs.shape == (len(labels) * views, *images.shape[1:])
    assert not torch.equal(inputs[0], inputs[1]), "the views of an example are all the same"

    net = _float64_model(small_model_config)
    params = [p for p in net.parameters() if p.requires_grad]
    reference = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    per_view = torch.zeros_like(reference)
    norms = []
    for i in range(len(labels)):
        rows = slice(i * views, (i + 1) * views)
        grads = torch.autograd.grad(
            F.cross_entropy(net(inputs[rows]), labels[i].repeat(views)), params)
        flat = torch.cat([g.flatten() for g in grads])
        norms.append(float(flat.norm()))
        reference += flat * min(1.0, clip / (norms[-1] + 1e-6))
        for v in range(views):
            row = slice(i * views + v, i * views + v + 1)
            grads = torch.autograd.grad(F.cross_entropy(net(inputs[row]), labels[i:i + 1]),
                                        params)
            one = torch.cat([g.flatten() for g in grads])
            per_view += one * min(1.0, clip / (float(one.norm()) + 1e-6)) / views
    reference /= len(labels)
    per_view /= len(labels)
    assert min(norms) < clip < max(norms), norms  # both branches of the clipping are taken

    net = _float64_model(small_model_config)
    got = _zero_noise_step(net, *engine_module(net, "einsum"), inputs,
                           labels.repeat_interleave(views), clip, views)
    assert float((got - reference).norm() / reference.norm()) < 1e-10
    assert float((per_view - reference).norm() / reference.norm()) > 1e-3


def test_dpsgd_with_augmentation_multiplicity_trains_and_refuses_ghost(site,
                                                                       small_model_config):
    torch.manual_seed(0)
    model = build_lora_model(small_model_config)
    before = adapter_state(model)
    config = TrainConfig(local_epochs=1, batch_size=16, lr=1e-2)
    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_augmentations=2)
    result = train_dpsgd(model, site.train.images, site.train.labels, config, dp, 1.0, seed=3)
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(result.loss)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with pytest.raises(ValueError, match="dp_augmentations"):
        train_dpsgd(model, site.train.images, site.train.labels, config,
                    DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_augmentations=2,
                             dp_grad_sample_mode="ghost"), 1.0, seed=3)
    with pytest.raises(ValueError, match="dp_augmentations"):
        DPConfig(dp_augmentations=-1)
