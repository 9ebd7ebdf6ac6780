"""Secure aggregation (SecAgg+) on the message API: the sum is right, nobody's update is seen.

Protocol tests drive the real hospital handler (``client.secure_aggregation``) and the real
coordinator (``server.secure_aggregation``) through an in-process Grid, with hospitals whose
"training" returns known updates, so the aggregate can be checked exactly. The last tests run
real hospitals (real PneumoniaMNIST, real LoRA training) through the whole round loop.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import handle_secagg
from privacy.secagg import SecAggConfig, SecAggError
from privacy.secagg.config import ACTION
from privacy.secagg.encoding import dequantize_sum, quantize
from privacy.secagg.graph import neighbour_graph
from privacy.secagg.local_consortium import local_consortium
from privacy.secagg.wire import RECORD
from server.secure_aggregation import SecureAggregationGrid, secure_grid
from simulations.inprocess import InProcessGrid

# Flower node ids are unsigned 64-bit: use ids above 2**63 to exercise their encoding.
NODES = [2**63 + 11 * k + 3 for k in range(5)]
SHAPES = {"body.lora_A.weight": (8, 400), "body.lora_B.weight": (240, 8), "head.weight": (2, 240)}


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}


def _updates(nodes: list[int]) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return {n: {k: rng.normal(0, 0.02, s) for k, s in SHAPES.items()} for n in nodes}


class Hospitals:
    """Hospitals whose training adds a known update; each may misbehave at one stage."""

    def __init__(self, nodes: list[int], weights: dict[int, float] | None = None) -> None:
        self.updates = _updates(nodes)
        self.weights = weights or {n: 50.0 + 30 * i for i, n in enumerate(nodes)}
        self.fail_at: dict[int, str] = {}
        self.tamper: dict[int, str] = {}
        self.identities = local_consortium(nodes)  # each node id enrolled, keys signed

    def train(self, msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        update = self.updates[context.node_id]
        new = ArrayRecord({k: Array((arrays[k].numpy() + update[k]).astype(np.float32))
                           for k in arrays})
        metrics = MetricRecord({"num-examples": self.weights[context.node_id],
                                "train-loss": 0.5})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    def app(self) -> ClientApp:
        app = ClientApp()

        @app.train(ACTION)
        def secagg(msg: Message, context: Context) -> Message:
            stage = str(msg.content.config_records[RECORD]["stage"])
            if self.fail_at.get(context.node_id) == stage:
                raise ConnectionError("hospital went offline")
            reply = handle_secagg(msg, context, self.train,
                                  lambda m, c, key: self.weights[c.node_id], self.identities)
            return _tampered(reply, self.tamper.get(context.node_id), stage)

        return app


def _tampered(reply: Message, how: str | None, stage: str) -> Message:
    if how == "garbage-shares" and stage == "share":
        record = reply.content.config_records[RECORD]
        record["ciphertexts"] = [bytes(len(c)) for c in record["ciphertexts"]]
    if how == "wrong-recipients" and stage == "share":
        record = reply.content.config_records[RECORD]
        record["destinations"] = record["destinations"][:-1]
    if how == "short-vector" and stage == "mask":
        vector = reply.content.array_records["masked"]["vector"].numpy()
        reply.content.array_records["masked"]["vector"] = Array(vector[:-3].copy())
    return reply


class RecordingGrid(InProcessGrid):
    """Keeps every array the coordinator side receives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[np.ndarray] = []

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for reply in replies:
            if reply.has_content():
                for record in reply.content.array_records.values():
                    self.received.extend(a.numpy() for a in record.values())
        return replies


def _round(hospitals: Hospitals, nodes: list[int], config: SecAggConfig | None = None,
           grid_cls=InProcessGrid, node_config: dict | None = None):
    inner = grid_cls(hospitals.app(), {n: dict(node_config or {}) for n in nodes})
    grid = SecureAggregationGrid(inner, config or SecAggConfig(enabled=True))
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    train_config = ConfigRecord({"server-round": 1, "seed": 0})
    messages = [Message(RecordDict({"arrays": arrays, "config": train_config}), dst_node_id=n,
                        message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=30))
    return replies, grid.reports[-1], inner


def _aggregate(replies: list[Message]) -> dict[str, np.ndarray]:
    arrays = [r.content.array_records["arrays"] for r in replies if r.has_content()]
    first = {k: a.numpy() for k, a in arrays[0].items()}
    for other in arrays[1:]:  # every survivor's reply carries the same aggregate
        assert all(np.array_equal(first[k], other[k].numpy()) for k in first)
    return first


def _plain_mean(hospitals: Hospitals, nodes: list[int]) -> dict[str, np.ndarray]:
    total = sum(hospitals.weights[n] for n in nodes)
    g = _global()
    return {k: g[k] + sum(hospitals.weights[n] * hospitals.updates[n][k] for n in nodes) / total
            for k in g}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    # float32 storage (~1e-8 here) plus quantisation (step 2/(2**20 - 1) ~ 1.9e-6 per hospital).
    for key in want:
        assert np.max(np.abs(got[key] - want[key])) < 2e-5, key


def test_secure_sum_equals_plain_weighted_mean():
    hospitals = Hospitals(NODES)
    replies, report, _ = _round(hospitals, NODES)
    assert sorted(report.survivors) == NODES and not report.excluded
    _assert_close(_aggregate(replies), _plain_mean(hospitals, NODES))
    # Each reply keeps its hospital's plain metrics and what it sent over all stages.
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        assert metrics["num-examples"] == hospitals.weights[reply.metadata.src_node_id]
        assert metrics["secagg-upload-bytes"] > 4 * sum(np.prod(s) for s in SHAPES.values())


def test_coordinator_never_holds_an_individual_update():
    hospitals = Hospitals(NODES)
    _, _, grid = _round(hospitals, NODES, grid_cls=RecordingGrid)
    assert grid.received, "the coordinator received no arrays at all"
    updates = [np.concatenate([u[k].ravel() for k in sorted(u)]) for u in
               hospitals.updates.values()]
    bound = 5 / np.sqrt(updates[0].size)  # 5 standard errors of an independent pair's corr
    for update in updates:  # the check can see an unmasked update
        codes, _ = quantize(update, 1.0, 20, np.random.default_rng(0))
        assert np.corrcoef(codes.astype(np.float64), update)[0, 1] > 0.99
    for array in grid.received:
        values = array.astype(np.float64).ravel()
        assert array.dtype == np.uint32  # only masked vectors arrive
        for update in updates:
            assert values.size == update.size
            assert abs(np.corrcoef(values, update)[0, 1]) < bound
            codes, _ = quantize(update, 1.0, 20, np.random.default_rng(0))
            assert not np.array_equal(array, codes)


@pytest.mark.parametrize("stage", ["share", "mask"])
def test_hospital_dropping_after_sharing_keys_is_left_out(stage):
    """'share': gone before sending shares; 'mask': shared keys, never sent its input."""
    hospitals = Hospitals(NODES)
    hospitals.fail_at[NODES[2]] = stage
    replies, report, _ = _round(hospitals, NODES)
    survivors = [n for n in NODES if n != NODES[2]]
    assert sorted(report.survivors) == survivors and NODES[2] in report.excluded
    _assert_close(_aggregate(replies), _plain_mean(hospitals, survivors))
    failed = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in failed] == [NODES[2]]
    assert "offline" in failed[0].error.reason


class SuperLinkAnswersGrid(InProcessGrid):
    """Replies of node ``gone`` at stage ``stage`` are replaced by the error the SuperLink sends
    on a lost node's behalf: from node 1, not from the node asked."""

    gone, stage = NODES[1], "mask"

    def pull_messages(self, message_ids):
        from flwr.app import Error

        from core.flower_compat import set_message_id

        replies = []
        for reply in super().pull_messages(message_ids):
            if reply.metadata.src_node_id == self.gone and \
                    reply.metadata.message_type.endswith(ACTION) and self.stage in self.asked:
                error = Message(Error(code=5, reason="the hospital's SuperNode restarted"),
                                reply_to=reply)
                error.metadata.__dict__["_src_node_id"] = 1
                set_message_id(error, "lost")
                error.metadata.__dict__["_reply_to_message_id"] = \
                    reply.metadata.reply_to_message_id
                reply = error
            replies.append(reply)
        return replies

    def push_messages(self, messages):
        messages = list(messages)
        self.asked = {str(m.content.config_records[RECORD]["stage"]) for m in messages
                      if RECORD in m.content.config_records}
        return super().push_messages(messages)


def test_an_error_the_superlink_sends_for_a_hospital_is_filed_under_it_with_its_reason():
    hospitals = Hospitals(NODES)
    replies, report, _ = _round(hospitals, NODES, grid_cls=SuperLinkAnswersGrid)
    assert sorted(report.survivors) == [n for n in NODES if n != NODES[1]]
    assert report.excluded[NODES[1]] == "mask: the hospital's SuperNode restarted"


def test_hospital_dropping_after_its_masked_input_stays_in_the_sum():
    hospitals = Hospitals(NODES)
    hospitals.fail_at[NODES[0]] = "unmask"
    replies, report, _ = _round(hospitals, NODES)
    assert sorted(report.survivors) == NODES
    _assert_close(_aggregate(replies), _plain_mean(hospitals, NODES))


def test_sparse_neighbour_graph_with_dropout():
    nodes = [100 + k for k in range(9)]
    config = SecAggConfig(enabled=True, group_size=5, threshold=3)
    graph = neighbour_graph(nodes, config.group_count(9), seed=1)
    assert all(len(v) == 4 for v in graph.values())  # SecAgg+: not everyone's neighbour
    hospitals = Hospitals(nodes)
    hospitals.fail_at[nodes[4]] = "mask"
    replies, report, _ = _round(hospitals, nodes, config)
    survivors = [n for n in nodes if n != nodes[4]]
    _assert_close(_aggregate(replies), _plain_mean(hospitals, survivors))


def test_too_few_hospitals_fail_the_round_cleanly():
    hospitals = Hospitals(NODES)
    for node in NODES[:3]:
        hospitals.fail_at[node] = "mask"
    replies, report, _ = _round(hospitals, NODES)
    assert not report.survivors
    assert all(r.has_error() for r in replies) and len(replies) == len(NODES)
    assert any("threshold" in r.error.reason for r in replies)


@pytest.mark.parametrize("how", ["garbage-shares", "wrong-recipients", "short-vector"])
def test_tampering_hospital_is_excluded_with_a_reason(how):
    hospitals = Hospitals(NODES)
    hospitals.tamper[NODES[1]] = how
    replies, report, _ = _round(hospitals, NODES)
    survivors = [n for n in NODES if n != NODES[1]]
    assert sorted(report.survivors) == survivors
    reason = report.excluded[NODES[1]]
    assert {"garbage-shares": "decrypt", "wrong-recipients": "malformed shares",
            "short-vector": "expected uint32"}[how] in reason
    _assert_close(_aggregate(replies), _plain_mean(hospitals, survivors))


def test_hospitals_enforce_their_own_minimum_sum(tmp_path):
    """A run policy's ``min_hospitals`` holds under secure aggregation without trusting the
    coordinator: with 4 of 5 left, hospitals requiring 5 refuse to unmask."""
    policy = tmp_path / "policy.toml"
    policy.write_text('min_hospitals = 5\nallowed_backbones = ["efficientnet-lite0-imagenet"]\n'
                      'allowed_tasks = [""]\n')
    hospitals = Hospitals(NODES)
    hospitals.fail_at[NODES[3]] = "mask"
    replies, report, _ = _round(hospitals, NODES, node_config={"run-policy": str(policy)})
    assert not report.survivors and all(r.has_error() for r in replies)
    assert any("at least 5" in reason for reason in report.excluded.values())


def test_policy_requiring_secure_aggregation_refuses_plain_training(tmp_path):
    from client.run_policy import RunPolicy, run_refusal

    policy = RunPolicy(require_secure_aggregation=True, allowed_tasks=[""],
                       allowed_backbones=["efficientnet-lite0-imagenet"])
    config = ConfigRecord({"backbone": "efficientnet-lite0-imagenet"})
    assert "only under secure aggregation" in run_refusal(policy, config, "train")
    assert run_refusal(policy, config, f"train.{ACTION}") == ""
    assert run_refusal(policy, config, "evaluate") == ""


def test_hospital_refuses_to_reveal_both_shares_of_one_hospital():
    hospitals = Hospitals(NODES[:3])
    app = hospitals.app()
    grid = InProcessGrid(app, {n: {} for n in NODES[:3]})
    node = NODES[0]
    context = grid.contexts[node]
    context.state["secagg-state"] = ConfigRecord({"round": 1, "node": str(node), "threshold": 2,
                                                  "min-sum": 2,
                                                  "held-from": [], "held-seed": [],
                                                  "held-key": [], "own-seed-share": b"",
                                                  "own-key-share": b""})
    request = Message(RecordDict({RECORD: ConfigRecord({
        "stage": "unmask", "round": 1, "dropped": [str(NODES[1])],
        "survivors": [str(NODES[1]), str(node)]})}), dst_node_id=node,
        message_type=f"train.{ACTION}")
    (reply,) = grid.send_and_receive([request])
    assert reply.has_error() and "both shares" in reply.error.reason


def test_quantisation_is_unbiased_and_within_a_step():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.3, 20_000)
    codes, clipped = quantize(values, 1.0, 12, rng)
    assert clipped == int(np.sum(np.abs(values) > 1.0))
    decoded = dequantize_sum(codes.astype(np.int64), 1, 1.0, 12)
    step = 2.0 / (2**12 - 1)
    inside = np.abs(values) <= 1.0
    assert np.max(np.abs(decoded - values)[inside]) <= step
    assert abs(np.mean((decoded - values)[inside])) < step / 20


def test_settings_that_cannot_protect_are_refused():
    with pytest.raises(SecAggError, match="overflow"):
        SecAggConfig(quantization_bits=30).check(8)
    with pytest.raises(SecAggError, match="at least 2"):
        SecAggConfig().check(1)
    assert SecAggConfig(threshold=0.1).threshold_count(5) == 3  # always a majority of shares
    with pytest.raises(ValueError, match="modulus_bits"):
        SecAggConfig(quantization_bits=20, modulus_bits=40)


def test_strategies_needing_individual_updates_are_refused():
    from server.config import FederationConfig
    from strategies import build_strategy

    with pytest.raises(ValueError, match="cannot run under secure aggregation"):
        FederationConfig(strategy="median", secure_aggregation=SecAggConfig(enabled=True))
    FederationConfig(strategy="fedadam", secure_aggregation=SecAggConfig(enabled=True))
    with pytest.raises(SecAggError, match="needs each hospital's update"):
        secure_grid(None, SecAggConfig(enabled=True), build_strategy("trimmed-mean"))


# --- real hospitals through the whole round loop ------------------------------------------


def _federate(tmp_path, name: str, secure: bool, dp=None, packed: bool = False,
              model_config=None, dataset: str = "pneumoniamnist"):
    from dataclasses import replace

    from client.app import build_client_app
    from models.adapters import adapter_state
    from privacy.noise import INSECURE_NOISE_KEY
    from server.config import FederationConfig
    from server.records import RunRecords
    from server.rounds import run_federation
    from simulations.config import DataConfig
    from simulations.sites import SimulatedSiteLoader, held_out_test_set

    data = DataConfig(dataset=dataset, num_hospitals=3, max_train_examples=240,
                      max_test_examples=100)
    model_config = model_config or replace(_small_model(), num_classes=2)
    from models.config import TrainConfig

    train = TrainConfig(local_steps=3, batch_size=16)
    grid = InProcessGrid(build_client_app(SimulatedSiteLoader(data, 0),
                                          load_identity=local_consortium([0, 1, 2])),
                         # Plain and secure rounds are compared value for value, so the DP
                         # noise must replay: the simulation-only insecure setting.
                         {NODES[k]: {"partition-id": k, INSECURE_NOISE_KEY: True}
                          for k in range(3)})
    if packed:  # the deployment's wire: one packed array per adapter (server.wire_grid)
        from server.wire_grid import PackedWireGrid

        grid = PackedWireGrid(grid, poll_interval_s=0.01)
    federation = FederationConfig(rounds=1, min_hospitals=3, fraction_evaluate=0.0,
                                  secure_aggregation=SecAggConfig(enabled=secure))
    records = RunRecords(tmp_path / name)
    outcome = run_federation(grid, federation, model_config, train,
                             held_out_test_set(data, model_config.image_size, 0), records, dp=dp)
    rows = [r for r in records.train_rows() if r["round"] == 1]
    return {k: v.numpy() for k, v in adapter_state(outcome.model).items()}, rows


def _small_model():
    from models.config import ModelConfig
    from models.registry import weights_sha256

    return ModelConfig(image_size=32, lora_r=4, lora_alpha=8,
                       weights_sha256=weights_sha256("efficientnet-lite0-imagenet"))


def _federate_start(key: str) -> np.ndarray:
    from models.adapters import adapter_state
    from server.rounds import initial_model

    return adapter_state(initial_model(_small_model(), 0))[key].numpy()


def test_real_hospitals_with_client_dp_under_secure_aggregation(tmp_path):
    """Real hospitals (PneumoniaMNIST, LoRA training) add their share of the DP noise before
    masking: the secure round's adapter is the plain round's, and the ledger charges the noise
    of the smallest sum the hospital lets be unmasked."""
    from privacy.config import DPConfig
    from privacy.update_dp import charge_noise_multiplier

    dp = DPConfig(update_clip_norm=0.5, update_noise_multiplier=1.0, update_hospitals=3)
    plain, plain_rows = _federate(tmp_path, "plain-dp", secure=False, dp=dp)
    secure, secure_rows = _federate(tmp_path, "secure-dp", secure=True, dp=dp)
    assert len(secure_rows) == 3 and not any(r.get("error") for r in secure_rows)
    assert any(np.max(np.abs(secure[k] - _federate_start(k))) > 1e-3 for k in secure)
    for key in plain:  # quantisation step here: 2 * 2.23 / (2**20 - 1) ~ 4e-6 per hospital
        assert np.max(np.abs(secure[key] - plain[key])) < 1e-4, key
    # Bytes per hospital: the masked uint32 vector is the size of the float32 update; keys
    # and shares add little.
    adapter_bytes = sum(v.nbytes for v in plain.values())
    assert all(adapter_bytes <= r["upload_bytes"] <= 1.1 * adapter_bytes for r in secure_rows)
    threshold = SecAggConfig().threshold_count(3)
    assert charge_noise_multiplier(1.0, 3, threshold) == pytest.approx((threshold / 3) ** 0.5)
    for plain_row, secure_row in zip(plain_rows, secure_rows, strict=True):
        assert 0 < secure_row["epsilon"] < plain_row["epsilon"]


def test_real_hospitals_with_dpsgd_under_secure_aggregation(tmp_path):
    """DP-SGD at the hospitals works unchanged under secure aggregation: the same seeded
    private training, so the secure round's adapter is the plain round's, and each hospital
    reports the epsilon its own accountant spent."""
    from privacy.config import DPConfig

    dp = DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    plain, plain_rows = _federate(tmp_path, "plain-dpsgd", secure=False, dp=dp)
    secure, secure_rows = _federate(tmp_path, "secure-dpsgd", secure=True, dp=dp)
    assert len(secure_rows) == 3 and not any(r.get("error") for r in secure_rows)
    assert any(np.max(np.abs(secure[k] - _federate_start(k))) > 1e-3 for k in secure)
    for key in plain:
        assert np.max(np.abs(secure[key] - plain[key])) < 1e-4, key
    for plain_row, secure_row in zip(plain_rows, secure_rows, strict=True):
        assert secure_row["epsilon"] > 0
        assert secure_row["epsilon"] == pytest.approx(plain_row["epsilon"])


def test_ct_foundation_adapter_under_secure_aggregation_is_the_plain_sum(tmp_path):
    """The CT encoder's Conv3d adapter (LoRA on layer4 and the head, real AdrenalMNIST3D
    volumes at three hospitals) goes through SecAgg+ like the 2D one: the secure round's
    adapter is the plain round's, and no hospital fails."""
    from models.adapters import adapter_state
    from models.config import ModelConfig
    from models.registry import CT_BACKBONE, weights_sha256
    from server.rounds import initial_model

    ct = ModelConfig(backbone=CT_BACKBONE, image_size=16, num_classes=2, lora_r=4, lora_alpha=8,
                     lora_targets=["layer4"], weights_sha256=weights_sha256(CT_BACKBONE))
    plain, _ = _federate(tmp_path, "plain-ct", secure=False, model_config=ct,
                         dataset="adrenalmnist3d-tissue")
    secure, rows = _federate(tmp_path, "secure-ct", secure=True, model_config=ct,
                             dataset="adrenalmnist3d-tissue")
    assert len(rows) == 3 and not any(r.get("error") for r in rows)
    start = {k: v.numpy() for k, v in adapter_state(initial_model(ct, 0)).items()}
    assert any("layer4" in k and "lora" in k for k in secure)
    assert any(np.max(np.abs(secure[k] - start[k])) > 1e-4 for k in secure)  # it trained
    for key in plain:
        assert np.max(np.abs(secure[key] - plain[key])) < 1e-4, key


def test_flower_simulation_runs_under_secure_aggregation(tmp_path):
    """``medfed simulate --secure-aggregation``'s path: Flower's simulation engine (Ray), the
    four stages as ``train.secagg`` messages to real ClientApps."""
    from simulations.config import load_config
    from simulations.runner import run_study

    config = load_config(None, {
        "run_dir": str(tmp_path / "run"), "baselines": [],
        "data": {"num_hospitals": 3, "partition": "iid", "max_train_examples": 180,
                 "max_test_examples": 60},
        "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
        "federation": {"rounds": 1, "min_hospitals": 3, "fraction_evaluate": 0.0,
                       "secure_aggregation": {"enabled": True}},
        "train": {"batch_size": 16, "local_steps": 2},
    })
    summary = run_study(config)
    import pandas as pd

    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"hospital": str})
    hospitals = metrics[metrics.hospital != "global"]
    assert len(hospitals) == 3 and hospitals["error"].isna().all()
    adapter = summary["bytes"]["adapter"]
    assert (hospitals["upload_bytes"] > adapter).all()  # masked vector + keys and shares
    assert np.isfinite(summary["federated"]["auc"])


def test_secure_round_over_the_packed_deployment_wire(tmp_path):
    """The deployment packs adapters into one array each way; SecAgg+'s stages pass through it
    and the unmasked sum is the one the unpacked wire gives."""
    unpacked, _ = _federate(tmp_path, "secure", secure=True)
    packed, rows = _federate(tmp_path, "secure-packed", secure=True, packed=True)
    assert len(rows) == 3 and not any(r.get("error") for r in rows)
    assert list(packed) == list(unpacked)
    for key in unpacked:
        assert np.max(np.abs(packed[key] - unpacked[key])) < 1e-4, key


# --- who counts as a peer: the CA-signed roster -------------------------------------------


def test_enrolment_signs_a_roster_that_each_hospital_checks_offline(tmp_path):
    """Enrolling writes the roster signed by the consortium CA; a hospital reads its identity
    from its site folder (node key, roster, ca.pem) and refuses an edited roster, one signed
    by another CA, or a roster that no longer lists it."""
    import shutil

    from flwr.app import Context, RecordDict

    from client.site_folder import init_site_folder, load_hospital_config, node_config
    from privacy.secagg.identity import ROSTER_FILE, identity_from_node_config
    from server.consortium import enrol, init_consortium, revoke

    folder = tmp_path / "consortium"
    init_consortium(folder, "test")
    sites = {}
    for name in ("north", "south", "east"):
        sites[name] = tmp_path / name
        init_site_folder(sites[name], name)
        enrol(folder, name, sites[name] / "node.pub")
    for site in sites.values():
        shutil.copy(folder / "ca" / "ca.pem", site / "ca.pem")
        shutil.copy(folder / ROSTER_FILE, site / ROSTER_FILE)

    def identity(name):
        site = sites[name]
        config = node_config(site, load_hospital_config(site))
        return identity_from_node_config(Context(run_id=1, node_id=1, node_config=config,
                                                 state=RecordDict(), run_config={}))

    north = identity("north")
    assert north.name == "north" and sorted(north.roster.keys) == ["east", "north", "south"]
    roster = sites["south"] / ROSTER_FILE
    roster.write_text(roster.read_text().replace('name = "east"', 'name = "evil"'))
    with pytest.raises(SecAggError, match="not signed by the consortium CA"):
        identity("south")
    other = tmp_path / "other"
    init_consortium(other, "other")
    shutil.copy(other / "ca" / "ca.pem", sites["south"] / "ca.pem")
    shutil.copy(folder / ROSTER_FILE, roster)
    with pytest.raises(SecAggError, match="not signed by the consortium CA"):
        identity("south")
    revoke(folder, "east")
    shutil.copy(folder / ROSTER_FILE, sites["east"] / ROSTER_FILE)
    with pytest.raises(SecAggError, match="not on the consortium roster"):
        identity("east")
    with pytest.raises(SecAggError, match="lacks"):
        identity_from_node_config(Context(run_id=1, node_id=1, node_config={},
                                          state=RecordDict(), run_config={}))
