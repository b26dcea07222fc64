"""Plausibility criteria: every rule's declaration checked against what its training step does.

For each claim whose ``test`` names ``test_claims_match_probes``, the probe of that criterion runs
one real training step and must agree with the declaration. ``bp`` is the negative control: it
declares every criterion false, and each probe must detect the violation on it.
"""

from __future__ import annotations

import ast

import pytest

from bioplaus.algorithms import probes
from bioplaus.algorithms.registry import load_rules
from conftest import REPO, batch, small_rule

RULES = list(load_rules())
GENERIC = "tests/test_criteria.py::test_claims_match_probes"


def measured(code: str, name: str, arch: str = "mlp", input_shape=(1, 8, 8)) -> bool:
    """Whether criterion ``code`` holds for rule ``name``, as the probes measure it on one step (an MLP unless
    ``arch`` says otherwise)."""
    x, y = batch(input_shape=input_shape)
    rule = small_rule(name, arch, input_shape=input_shape)
    n_stages = len(rule.net.stages)
    if code == "C1":
        return not probes.weight_reads(rule, x, y)
    if code == "C2":
        return not probes.gradient_crossings(rule, x, y)
    if code == "C3":
        single = all(c == 1 for c in probes.layer_calls(small_rule(name, arch, input_shape=input_shape), x, y))
        return single and not probes.gradient_crossings(rule, x, y)
    if code == "C4":
        return not probes.label_dependent_blocks(rule, x, y)
    raise KeyError(f"no generic probe for {code} (stage count {n_stages}); the rule must name its own test")


@pytest.mark.parametrize("name", RULES)
def test_claims_match_probes(name):
    claims = load_rules()[name].criteria
    checked = {code: claim for code, claim in claims.items() if claim.test.startswith(GENERIC)}
    if not checked:
        pytest.skip(f"{name} proves its criteria in its own tests")
    for code, claim in checked.items():
        assert measured(code, name) == claim.holds, f"{name} declares {code}={claim.holds}, the probe measures otherwise"


def test_bp_violations_are_detected_by_every_probe():
    """Negative control: the probes see weight transport, chained errors, a backward sweep and label use in bp."""
    x, y = batch()
    assert probes.weight_reads(small_rule("bp"), x, y) == {1, 2}  # W2, W3 carry the error down; W1 has no input grad
    assert probes.gradient_crossings(small_rule("bp"), x, y) == {1, 2}
    assert probes.layer_calls(small_rule("bp"), x, y) == [1, 1, 1]
    assert probes.label_dependent_blocks(small_rule("bp"), x, y) == {0, 1}


def test_probes_pass_a_rule_that_trains_only_the_head():
    """Positive control for the probes: with hidden blocks frozen and detached, nothing crosses."""
    import torch
    import torch.nn.functional as F

    rule = small_rule("bp")
    x, y = batch()

    def head_only(xb, yb):
        with torch.no_grad():
            h = xb
            for block in rule.net.blocks:
                h = block(h)
        loss = F.cross_entropy(rule.net.head(h), yb)
        rule.opt.zero_grad()
        loss.backward()
        rule.opt.step()
        return {"loss": loss}

    rule.train_step = head_only
    assert probes.weight_reads(rule, x, y) == set()
    assert probes.gradient_crossings(rule, x, y) == set()
    assert probes.label_dependent_blocks(rule, x, y) == set()


@pytest.mark.parametrize("name", RULES)
def test_every_claim_names_an_existing_test(name):
    """A claim's proof must exist: its ``test`` is a pytest node id of a test function in tests/."""
    for code, claim in load_rules()[name].criteria.items():
        path, _, func = claim.test.partition("::")
        func = func.split("[")[0]
        file = REPO / path
        assert file.is_file(), f"{name}.{code}: {path} does not exist"
        tree = ast.parse(file.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert func in names, f"{name}.{code}: {func} is not a test in {path}"
