"""The hospital's privacy policy decides whether rounds without differential privacy run:
``require_dp = true`` (the template) refuses them, ``require_dp = false`` takes them, spending
nothing from the budget, while DP rounds stay under the budget."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import build_client_app
from client.privacy_round import REFUSAL_CODE, SitePrivacy
from client.site_folder import POLICY_TEMPLATE
from models.adapters import adapter_state
from models.config import TrainConfig, to_config_record
from models.lora import build_lora_model
from privacy.config import DPConfig
from privacy.ledger import Ledger
from privacy.policy import load_site_policy
from simulations.inprocess import coordinator_message


def _round(model_config, train: TrainConfig, dp: DPConfig, server_round: int):
    torch.manual_seed(0)
    arrays = ArrayRecord(adapter_state(build_lora_model(model_config)))
    record = to_config_record(model_config, train, dp)
    record["server-round"] = server_round
    return coordinator_message("train", arrays, record, run_id=5)


@pytest.mark.parametrize("require_dp", [True, False])
def test_the_template_policy_takes_non_private_rounds_only_when_require_dp_is_false(
        tmp_path, site, small_model_config, require_dp):
    policy_file = tmp_path / "privacy-policy.toml"
    policy_file.write_text(POLICY_TEMPLATE.replace(
        "require_dp = true", f"require_dp = {str(require_dp).lower()}"))
    policy = load_site_policy(policy_file)
    assert policy.require_dp is require_dp
    ledger = Ledger(tmp_path / "ledger.sqlite")
    privacy = SitePrivacy(policy=policy, ledger=ledger, dataset_id="cxr-2026")
    app = build_client_app(lambda context, image_size: site, lambda context: privacy)
    context = Context(run_id=5, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    train = TrainConfig(local_steps=2, batch_size=16, lr=1e-3)

    plain = app(_round(small_model_config, train, DPConfig(), 1), context)
    if require_dp:
        assert plain.has_error() and plain.error.code == REFUSAL_CODE
        assert "without differential privacy" in plain.error.reason
    else:
        assert not plain.has_error(), plain.error.reason
        metrics = plain.content.metric_records["metrics"]
        assert metrics["num-examples"] == len(site.train)
        assert "train-loss" not in metrics  # still withheld under a privacy policy
        assert "dp-epsilon" not in metrics
    assert ledger.rows("cxr-2026") == []  # a non-private round is never charged

    if require_dp:
        return
    # DP rounds are still accounted against the budget.
    private = app(_round(small_model_config, train,
                         DPConfig(dpsgd=True, dp_noise_multiplier=1.0), 2), context)
    assert not private.has_error(), private.error.reason
    assert [r.server_round for r in ledger.rows("cxr-2026")] == [2]


@pytest.mark.parametrize("line, words", [
    ('accountant = "moments"', "accountant = 'moments': must be one of 'rdp', 'prv'"),
    ("delta = 2.0", "delta = 2.0: must be > 0, < 1"),
    ("max_epsilon = 0", "max_epsilon = 0.0: must be > 0"),
    ('max_epsilon = "eight"', "max_epsilon = 'eight': expected a number"),
    ('require_dp = "no"', "require_dp = 'no': expected true or false"),
    ("require_pd = false", "unknown settings ['require_pd']"),
])
def test_a_policy_file_is_refused_naming_key_value_and_allowed(tmp_path, line, words):
    path = tmp_path / "privacy-policy.toml"
    text = POLICY_TEMPLATE + line + "\n" if line.startswith("require_pd") else "\n".join(
        row for row in POLICY_TEMPLATE.splitlines()
        if not row.startswith(line.split(" =")[0] + " ")) + "\n" + line + "\n"
    path.write_text(text)
    with pytest.raises(ValueError) as refused:
        load_site_policy(path)
    assert str(path) in str(refused.value) and words in str(refused.value), refused.value
