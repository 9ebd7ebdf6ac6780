"""A hospital's run policy is read by the one typed reader: a value of the wrong type or out of
range is refused when the file is read, naming the file, the key, the value and what is
allowed."""

from __future__ import annotations

import pytest

from client.run_policy import RUN_POLICY_TEMPLATE, RunPolicyError, load_run_policy


@pytest.mark.parametrize("line, words", [
    ("max_lora_rank = -1", "max_lora_rank = -1: must be >= 0"),
    ('max_image_size = "big"', "max_image_size = 'big': expected a whole number"),
    ("max_rounds = 2.5", "max_rounds = 2.5: expected a whole number"),
    ("allow_stem_lora = 1", "allow_stem_lora = 1: expected true or false"),
    ("allowed_tasks = [1]", "allowed_tasks[0] = 1: expected a string"),
    ('allowed_tasks = "pneumonia-cxr"', "allowed_tasks = 'pneumonia-cxr': expected a list"),
    ("evaluation_decimals = -2", "evaluation_decimals = -2: must be >= 0"),
])
def test_a_run_policy_value_is_refused_naming_key_value_and_allowed(tmp_path, line, words):
    key = line.split(" =")[0]
    rows = [r for r in RUN_POLICY_TEMPLATE.splitlines() if not r.startswith(key + " ")]
    path = tmp_path / "run-policy.toml"
    path.write_text("\n".join(rows) + "\n" + line + "\n")
    with pytest.raises(RunPolicyError) as refused:
        load_run_policy(path)
    assert str(path) in str(refused.value) and words in str(refused.value), refused.value


def test_the_template_reads_as_written(tmp_path):
    path = tmp_path / "run-policy.toml"
    path.write_text(RUN_POLICY_TEMPLATE)
    policy = load_run_policy(path)
    assert policy.min_hospitals == 3 and policy.require_secure_aggregation
    assert policy.allowed_apps == [] and policy.max_evaluations_per_run == 5
