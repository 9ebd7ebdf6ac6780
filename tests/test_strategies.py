"""Aggregation rules on hand-built updates, and the LoRA-aware exchanges at a real hospital."""


import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import build_client_app
from client.exchange import PERSONAL_STATE_KEY
from core.flower_compat import task_identity
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from simulations.inprocess import coordinator_message, message_with_metadata
from strategies import STRATEGIES, StrategyOptions, build_strategy
from strategies.replies import update_norm

SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2), "head.weight": (4,)}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Flower's coordinator process sets its run id before a strategy builds messages."""
    with task_identity(run_id=1, node_id=0, task_id=1):
        yield


class _Grid:
    """Just enough of a Grid for a strategy's configure_train: a fixed set of nodes."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes


def _record(value: float) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, np.float32)) for k, s in SHAPES.items()})


def _reply(node: int, arrays: ArrayRecord, examples: int = 10) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train-loss": 0.5})
    return message_with_metadata("train", RecordDict({"arrays": arrays, "metrics": metrics}),
                                 src_node_id=node, dst_node_id=0, message_id=f"r{node}")


def _aggregate(name: str, values: list[float], global_value: float = 0.0,
               examples: list[int] | None = None, **options):
    """One round of ``name`` on updates that fill every tensor with one value each; hospital
    ``i`` reports ``examples[i]`` training examples (10 each by default)."""
    examples = examples or [10] * len(values)
    seen = []
    strategy = build_strategy(name, observer=seen.append, min_train_nodes=1,
                              min_available_nodes=1, options=StrategyOptions(**options))
    global_arrays = _record(global_value)
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid(len(values))))
    exchanged = strategy.exchanged(global_arrays)
    replies = [_reply(i + 1, ArrayRecord({k: Array(np.full(SHAPES[k], v, np.float32))
                                          for k in exchanged}), examples[i])
               for i, v in enumerate(values)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, seen


HONEST = [0.9, 1.0, 1.0, 1.1]
ATTACKS = {"sign-flipped x10": -10.0, "scaled x50": 50.0}


def test_median_and_trimmed_mean_of_known_values():
    arrays, _ = _aggregate("median", [1.0, 2.0, 3.0, 4.0, 100.0])
    assert np.allclose(arrays["head.weight"].numpy(), 3.0)
    arrays, _ = _aggregate("trimmed-mean", [1.0, 2.0, 3.0, 4.0, 100.0], trim_fraction=0.2)
    assert np.allclose(arrays["head.weight"].numpy(), 3.0)  # mean of 2, 3, 4


def test_fedavg_is_the_example_weighted_mean():
    # 30 examples at 1.0 and 10 at 3.0: (30 * 1 + 10 * 3) / 40 = 1.5 (unweighted: 2.0).
    arrays, _ = _aggregate("fedavg", [1.0, 3.0], examples=[30, 10])
    for name in SHAPES:
        assert np.allclose(arrays[name].numpy(), 1.5), name


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_robust_rules_survive_one_hostile_hospital_fedavg_does_not(attack):
    honest_mean = float(np.mean(HONEST))
    values = HONEST + [ATTACKS[attack]]
    fedavg, _ = _aggregate("fedavg", values)
    assert abs(fedavg["head.weight"].numpy()[0] - honest_mean) > 1.0
    for rule in ("median", "trimmed-mean", "norm-bound"):
        arrays, _ = _aggregate(rule, values)
        got = arrays["head.weight"].numpy()
        # Same direction as the honest hospitals, and no further from them than they spread.
        assert np.all(got > 0.5) and np.all(got < 1.2), (rule, got)


def test_fedadam_and_fedyogi_step_along_the_averaged_delta_by_about_eta():
    for name in ("fedadam", "fedyogi"):
        arrays, _ = _aggregate(name, [1.0, 1.0], global_value=0.0, server_lr=0.01)
        step = arrays["head.weight"].numpy()
        assert np.all(step > 0) and np.all(step <= 0.0101), (name, step)
        assert step.dtype == np.float32  # the next round checks updates against this dtype
        arrays, _ = _aggregate(name, [-1.0, -1.0], global_value=0.0, server_lr=0.01)
        assert np.all(arrays["head.weight"].numpy() < 0)


def test_update_beyond_the_norm_bound_is_dropped_with_a_reason():
    arrays, seen = _aggregate("fedavg", [1.0, 1.0, 30.0], max_update_norm=10.0)
    assert np.allclose(arrays["head.weight"].numpy(), 1.0)
    dropped = [r for r in seen if r.error]
    assert len(dropped) == 1 and dropped[0].node_id == 3
    assert "exceeds the bound" in dropped[0].error
    assert update_norm(_record(1.0), _record(0.0)) == pytest.approx(np.sqrt(6 + 6 + 4))


def test_ffa_and_fedsa_aggregate_only_their_shared_factor():
    arrays, seen = _aggregate("ffa-lora", [1.0, 3.0], global_value=0.5)
    assert np.allclose(arrays["layer.lora_A.weight"].numpy(), 0.5)  # frozen: global value
    assert np.allclose(arrays["layer.lora_B.weight"].numpy(), 2.0)
    assert not any(r.error for r in seen)
    arrays, _ = _aggregate("fedsa-lora", [1.0, 3.0], global_value=0.5)
    assert np.allclose(arrays["layer.lora_A.weight"].numpy(), 2.0)
    assert np.allclose(arrays["layer.lora_B.weight"].numpy(), 0.5)  # never sent: unchanged


def test_sum_only_flags_and_unknown_names():
    sum_only = {n for n, cls in STRATEGIES.items() if cls.needs_only_sum}
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "ffa-lora", "fedsa-lora",
            "hetlora"} <= sum_only
    assert not sum_only & {"median", "trimmed-mean", "norm-bound"}
    with pytest.raises(ValueError, match="unknown strategy 'krum'"):
        build_strategy("krum")


# --- the exchanges at a hospital (real model, real images, one short round) ---------------

SITE = (32, 16, 0)  # the conftest ``site`` fixture: train, val images, seed


def _message(kind: str, arrays: ArrayRecord, config) -> Message:
    return coordinator_message(kind, arrays, config)


def _round(small_model_config, mode: str):
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(small_model_config)))
    config = to_config_record(small_model_config, TrainConfig(local_steps=2, batch_size=16))
    config["server-round"] = 1
    config["adapter-exchange"] = mode
    return arrays, config


def _nbytes(record, part: str) -> int:
    return sum(len(a.data) for k, a in record.items() if part in k)


def test_ffa_lora_hospital_trains_and_sends_only_b_and_head(site, small_model_config):
    app = build_client_app(lambda context, image_size: site)
    arrays, config = _round(small_model_config, "ffa")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    sent = app(_message("train", arrays, config), context).content["arrays"]
    assert not [k for k in sent if "lora_A" in k]
    assert set(sent) == {k for k in arrays if "lora_A" not in k}
    changed = [k for k in sent if "lora_B" in k
               and not np.array_equal(sent[k].numpy(), arrays[k].numpy())]
    assert changed, "B did not train"
    # Upload: the B half of the LoRA bytes plus the head, never A.
    lora = _nbytes(arrays, "lora_")
    assert _nbytes(sent, "lora_") == _nbytes(arrays, "lora_B") < lora
    assert 0.4 < _nbytes(sent, "lora_") / lora < 0.6


def test_fedsa_lora_hospital_keeps_its_b_between_rounds(site, small_model_config):
    app = build_client_app(lambda context, image_size: site)
    arrays, config = _round(small_model_config, "fedsa")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    sent = app(_message("train", arrays, config), context).content["arrays"]
    assert not [k for k in sent if "lora_B" in k] and [k for k in sent if "lora_A" in k]
    kept = context.state[PERSONAL_STATE_KEY]
    assert set(kept) == {k for k in arrays if "lora_B" in k}
    assert any(not np.array_equal(kept[k].numpy(), arrays[k].numpy()) for k in kept)
    # Evaluating with the coordinator's adapter uses the hospital's own B, not the global one.
    config["adapter-exchange"] = "fedsa"
    personal = app(_message("evaluate", arrays, config), context).content["metrics"]
    fresh = Context(run_id=1, node_id=8, node_config={"partition-id": 1}, state=RecordDict(),
                    run_config={})
    shared = app(_message("evaluate", arrays, config), fresh).content["metrics"]
    assert personal["val-loss"] != shared["val-loss"]


def _changed(sent: ArrayRecord, start: ArrayRecord) -> set[str]:
    return {k for k in sent if not np.array_equal(sent[k].numpy(), start[k].numpy())}


@pytest.mark.parametrize("dpsgd", [False, True])
def test_trainable_moves_only_its_tensors_and_a_later_round_resets_it(site, small_model_config,
                                                                       dpsgd):
    """``train.trainable``: a head round leaves every LoRA factor as received (under DP-SGD too:
    no noise lands on a tensor that does not train), an adapter round leaves the head, and the
    same cached model trains everything again in a later ``all`` round."""
    from privacy.config import DPConfig

    app = build_client_app(lambda context, image_size: site)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    arrays, _ = _round(small_model_config, "all")
    # The head's weights; its fixed input centre (models.feature_centre) never trains.
    head = {k for k in arrays if "lora_" not in k and ".centre." not in k}
    moved = {}
    for server_round, trainable in enumerate(("head", "adapter", "all"), start=1):
        configs = [small_model_config, TrainConfig(local_steps=2, batch_size=16,
                                                   trainable=trainable)]
        if dpsgd:
            configs.append(DPConfig(dpsgd=True, dp_noise_multiplier=1.0, dp_run_rounds=3))
        config = to_config_record(*configs)
        # Rounds 1, 2, 3: a hospital refuses a training round it already answered.
        config["server-round"] = server_round
        sent = app(_message("train", arrays, config), context).content["arrays"]
        moved[trainable] = _changed(sent, arrays)
    assert moved["head"] == head
    assert moved["adapter"] and not moved["adapter"] & head
    assert moved["all"] == moved["adapter"] | head


def test_a_frozen_lora_block_stays_out_of_the_cached_prefix(small_model_config, site):
    """With only the head training, the LoRA blocks are not cached: their output changes with
    the adapter each round brings, which the cache key does not hold."""
    from models.lora_parts import set_trainable

    model = build_lora_model(small_model_config)
    classifier = model.base_model.model
    split = classifier.split_index()
    set_trainable(model, "head")
    assert classifier.split_index() == split
    batch = site.train.images[:8]
    model.eval()
    with torch.no_grad():
        before = model(batch)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
        assert not torch.allclose(model(batch), before)
    set_trainable(model, "all")


def test_fedprox_term_keeps_the_adapter_nearer_the_round_start(site, small_model_config):
    from client.training import train_local
    from models.adapters import load_adapter_state

    torch.manual_seed(0)
    model = build_lora_model(small_model_config)
    start = adapter_state(model)
    moved = {}
    for mu in (0.0, 50.0):
        load_adapter_state(model, start)
        train_local(model, site.train.images, site.train.labels,
                    TrainConfig(local_steps=6, batch_size=16, lr=1e-2, proximal_mu=mu), seed=1)
        after = adapter_state(model)
        moved[mu] = float(sum(((after[k] - start[k]) ** 2).sum() for k in start)) ** 0.5
    assert 0 < moved[50.0] < moved[0.0]


def test_unknown_strategy_is_refused_when_the_config_is_read():
    from simulations.config import load_config

    with pytest.raises(ValueError, match="federation.strategy = 'fedx': must be one of"):
        load_config(None, {"federation": {"strategy": "fedx"}})
    config = load_config(None, {"federation": {"strategy": "fedadam",
                                               "options": {"server-lr": 0.003}}})
    assert config.federation.options.server_lr == 0.003


def test_hetlora_truncate_and_pad_keep_the_low_rank_update():
    from models.lora_parts import pad_rank, truncate_rank

    rng = np.random.default_rng(0)
    state = {"conv.lora_A.weight": torch.tensor(rng.normal(size=(4, 3, 3, 3)), dtype=torch.float32),
             "conv.lora_B.weight": torch.tensor(rng.normal(size=(5, 4, 1, 1)), dtype=torch.float32),
             "head.weight": torch.ones(2, 5)}
    low = truncate_rank(state, 2)
    assert low["conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert low["conv.lora_B.weight"].shape == (5, 2, 1, 1)
    back = pad_rank(low, 4)
    assert torch.equal(back["conv.lora_A.weight"][:2], state["conv.lora_A.weight"][:2])
    assert not back["conv.lora_A.weight"][2:].any() and not back["conv.lora_B.weight"][:, 2:].any()
    assert torch.equal(back["head.weight"], state["head.weight"])
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_rank(state, 5)


def test_hetlora_hospitals_train_their_rank_and_reply_at_the_global_rank(site,
                                                                         small_model_config):
    """Global rank 4; hospital 0 trains rank 1, hospital 1 rank 4 (``hetlora-ranks``)."""
    from client.exchange import hospital_model_config

    seen = []
    strategy = build_strategy("hetlora", observer=seen.append, min_train_nodes=1,
                              min_available_nodes=1, options=StrategyOptions(hetlora_ranks=[1, 4]))
    arrays, config = _round(small_model_config, "all")
    messages = list(strategy.configure_train(1, arrays, config, _Grid(2)))
    sent_config = messages[0].content["config"]
    assert sent_config["hetlora"] and list(sent_config["hetlora-ranks"]) == [1, 4]

    app = build_client_app(lambda context, image_size: site)
    replies = []
    for partition, node in ((0, 1), (1, 2)):
        context = Context(run_id=1, node_id=node, node_config={"partition-id": partition},
                          state=RecordDict(), run_config={})
        reply = app(_message("train", arrays, sent_config), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(message_with_metadata("train", reply.content, src_node_id=node,
                                             dst_node_id=0, message_id=f"h{node}"))
        rank = hospital_model_config(small_model_config, sent_config, context)
        assert rank.lora_r == [1, 4][partition]
        # Same scale alpha/r as the global adapter: truncation keeps scale * B @ A's low part.
        assert rank.lora_alpha / rank.lora_r == small_model_config.lora_alpha / 4
    low = replies[0].content["arrays"]
    assert {k: tuple(a.shape) for k, a in low.items()} == {k: tuple(a.shape)
                                                           for k, a in arrays.items()}
    for key in (k for k in low if "lora_A" in k):
        assert not low[key].numpy()[1:].any(), key  # rows beyond rank 1: zero padding
    full_rows = [k for k in replies[1].content["arrays"] if "lora_A" in k]
    assert any(replies[1].content["arrays"][k].numpy()[1:].any() for k in full_rows)
    key = full_rows[0]

    merged, _ = strategy.aggregate_train(1, replies)
    assert not [r for r in seen if r.error]
    assert {k: tuple(a.shape) for k, a in merged.items()} == {k: tuple(a.shape)
                                                              for k, a in arrays.items()}
    # Components 2..4 of A: only hospital 1 trained them, averaged with hospital 0's zeros.
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    share = weights[1] / sum(weights)
    expected = share * replies[1].content["arrays"][key].numpy()[1:]
    assert np.allclose(merged[key].numpy()[1:], expected, atol=1e-6)


def test_hetlora_rank_above_the_global_rank_is_refused(site, small_model_config, caplog):
    arrays, config = _round(small_model_config, "all")
    config["hetlora"] = True
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "lora-rank": 8},
                      state=RecordDict(), run_config={})
    app = build_client_app(lambda context, image_size: site)
    reply = app(_message("train", arrays, config), context)  # a local failure is answered
    # The coordinator gets the category; the reason stays in the hospital's own log.
    assert reply.has_error() and reply.error.reason.startswith("local-failure: ValueError")
    assert "node config 'lora-rank': LoRA rank 8 must be between 1 and the global rank 4" \
        in caplog.text


def test_a_run_without_rounds_is_refused_when_the_config_is_read():
    from simulations.config import load_config

    with pytest.raises(ValueError, match="federation.rounds = 0: must be >= 1"):
        load_config(None, {"federation": {"rounds": 0}})


def test_fedavg_result_does_not_depend_on_the_order_replies_arrive_in():
    """Hospitals finish in any order; float sums depend on order, so the strategy sorts them
    (by the hospital id a simulated hospital reports, else node id) and a seed replays a run."""
    rng = np.random.default_rng(0)
    updates = [{k: (rng.normal(size=s) * 10.0 ** rng.integers(-3, 3, size=s)).astype(np.float32)
                for k, s in SHAPES.items()} for _ in range(5)]
    examples = [40, 576, 2775, 411, 436]

    def aggregate(order: list[int]) -> dict[str, np.ndarray]:
        strategy = build_strategy("fedavg", min_train_nodes=1, min_available_nodes=1)
        global_arrays = _record(0.0)
        list(strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid(5)))
        replies = []
        for i in order:
            metrics = MetricRecord({"num-examples": examples[i], "train-loss": 0.5,
                                    "hospital-id": i})
            arrays = ArrayRecord({k: Array(v) for k, v in updates[i].items()})
            replies.append(message_with_metadata(
                "train", RecordDict({"arrays": arrays, "metrics": metrics}),
                src_node_id=100 - i, dst_node_id=0, message_id=f"r{i}"))
        arrays, _ = strategy.aggregate_train(1, replies)
        return {k: arrays[k].numpy() for k in SHAPES}

    orders = [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]]
    results = [aggregate(order) for order in orders]
    assert all(np.array_equal(results[0][k], r[k]) for r in results[1:] for k in SHAPES)
    # The same weighted sum taken in arrival order differs in the last bits: sorting matters.
    naive = [[sum(np.float32(examples[i] / sum(examples)) * updates[i][k] for i in order)
              for k in SHAPES] for order in orders]
    assert any(not np.array_equal(a, b)
               for n in naive[1:] for a, b in zip(naive[0], n, strict=True))
