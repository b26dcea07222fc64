"""Every registered rule has a valid search space; malformed files are refused naming file and key."""

from __future__ import annotations

import pytest

from bioplaus.algorithms.registry import get_rule, load_rules
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.search_space import load_search_space


@pytest.mark.parametrize("name", list(load_rules()))
def test_every_rule_has_a_valid_search_space(name):
    space = load_search_space(get_rule(name))
    assert space, f"search_spaces/{name}.yaml searches nothing"


BAD = [
    ("rule: bp\nparams: {lr: {type: loguniform, low: 0, high: 1}}", "params.lr: loguniform needs low > 0"),
    ("rule: bp\nparams: {lrx: {type: uniform, low: 0, high: 1}}", "params.lrx is not a hyperparameter"),
    ("rule: bp\nparams: {lr: {type: gaussian}}", "params.lr: needs type"),
    ("rule: bp\nparams: {lr: {type: uniform, low: 2, high: 1}}", "low < high"),
    ("rule: bp\nparams: {lr: {type: uniform, low: 0}}", r"missing \['high'\]"),
    ("rule: bp\nparams: {optimizer: {type: categorical, choices: []}}", "non-empty list"),
    ("rule: fa\nparams: {}", "must hold 'rule: bp'"),
    ("rule: bp\nparams: [1, 2", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_malformed_search_space_is_refused(tmp_path, text, message):
    path = tmp_path / "bp.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as e:
        load_search_space(get_rule("bp"), path)
    assert str(path) in str(e.value)
