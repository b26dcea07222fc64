"""Plausibility criteria: every rule's declaration checked against what its training step does.

The measurements (``bioplaus.algorithms.criteria.measure``) run each rule, with its settings, on every
architecture it supports (tiny widths, one batch, float64) and must agree with every declared claim they can
see; a claim they cannot see names why (``Claim.probe_cannot_see``) and its own test establishes it. ``bp`` is
the negative control: it declares every criterion false, and each probe must detect the violation on it.
The instruments of ``bioplaus.algorithms.probes`` (autograd saved tensors, crossings, layer calls) are
checked too, with a positive control that trains only the head.
"""

from __future__ import annotations

import ast

import pytest
import torch

from bioplaus.algorithms import criteria, probes, transport
from bioplaus.algorithms.arch import ARCHS
from bioplaus.algorithms.registry import load_rules
from bioplaus.orchestrator.config import typed
from conftest import REPO, batch, small_rule

RULES = list(load_rules())
GENERIC = "tests/test_criteria.py::test_claims_match_probes"
SMALL = {"mlp": {"widths": [16, 16]}, "cnn": {"channels": [4, 8]}, "deep_cnn": {"channels": [4, 4, 8, 8]},
         "resnet20": {"channels": [4, 8], "blocks_per_stage": 1}, "resnet18": {"channels": [4, 8], "blocks_per_stage": 1}}


def measure(name: str, arch: str = "mlp", hp: dict | None = None) -> dict[str, dict]:
    """criterion -> the row of ``criteria.compare`` for rule ``name`` on a tiny ``arch`` (8x8 inputs, 8 examples)."""
    cls, spec = load_rules()[name], ARCHS[arch]
    shape = (3, 8, 8) if arch.startswith("resnet") else (1, 8, 8)
    model = typed(spec.config, {**cls.arch_defaults.get(arch, {}), **SMALL[arch]}, "model")
    build = criteria.builder(cls, typed(cls.HParams, {**cls.arch_hparams.get(arch, {}), **(hp or {})}, "hp"), spec,
                             model, shape, 10)
    x, y = batch(8, input_shape=shape)
    return {r["criterion"]: r for r in criteria.compare(cls, criteria.measure(build, x.double(), y))}


def measured(code: str, name: str, arch: str = "mlp", input_shape=None) -> bool | None:
    """Whether criterion ``code`` holds for rule ``name`` on ``arch``, as measured (None: not measurable)."""
    return measure(name, arch)[code]["holds"]


def supported(name: str) -> list[str]:
    return [arch for arch, why in load_rules()[name].archs.items() if why is None and arch in SMALL]


@pytest.mark.parametrize("name", RULES)
def test_claims_match_probes(name):
    """On every supported architecture, each declared claim the probes can see agrees with the measurement; C1 is
    measurable for every rule; a claim marked ``probe_cannot_see`` is one the probe does get wrong somewhere (else
    the mark is stale), and its own test establishes it."""
    claims = load_rules()[name].criteria
    blind_wrong: dict[str, bool] = {code: False for code, c in claims.items() if c.probe_cannot_see}
    for arch in supported(name):
        rows = measure(name, arch)
        assert rows["C1"]["established_by"] == "probe", (name, arch, rows["C1"])
        for code, row in rows.items():
            assert row["agree"] is not False, (f"{name} on {arch} declares {code}={row['declared']}; measured "
                                               f"{row['value']:.3g} (threshold {row['threshold']:g}): {row['method']}")
            if code in blind_wrong and row["holds"] is not None:
                blind_wrong[code] |= row["holds"] != row["declared"]
            if code in claims and row["established_by"] != "probe":
                assert claims[code].test in row["established_by"], row
    stale = [code for code, wrong in blind_wrong.items() if not wrong]
    assert not stale, f"{name}: probe_cannot_see set on {stale}, yet the probe measures them right everywhere"


def test_c1_follows_the_options_and_the_controls():
    """dtp's default targets travel through learned inverses (no transport); with top_target=gradient the top
    hidden block's target goes through the head's W^T. fa and dfa pass; bp and sign-symmetry (sign(W^T)) fail."""
    default, gradient = measure("dtp")["C1"], measure("dtp", hp={"top_target": "gradient"})["C1"]
    assert default["holds"] is True and default["value"] < 1e-10
    assert gradient["holds"] is False and gradient["value"] > 0.1 and gradient["agree"] is False  # declared: default
    for name in ("fa", "dfa"):
        assert measure(name)["C1"]["holds"] is True, name
        assert measure(name, "resnet20")["C1"]["holds"] is True, name
    for name in ("bp", "sign_symmetry"):
        row = measure(name)["C1"]
        assert row["holds"] is False and row["value"] > 0.1, (name, row)


def test_in_head_and_in_block_transport_are_their_own_entries():
    """local_losses' aux heads backpropagate through their own weights: C1 (other blocks) holds, C1_head does not;
    on a ResNet the error also goes from a block's second conv to its first (C1_within). node_perturbation's
    readout is only evaluated forwards (its own head entry holds); fa has no local heads."""
    mlp, resnet = measure("local_losses"), measure("local_losses", "resnet20")
    assert mlp["C1"]["holds"] is True and mlp["C1_head"]["holds"] is False and mlp["C1_head"]["value"] > 0.1
    assert mlp["C1_within"]["holds"] is None  # no block of an mlp has two weight layers
    assert resnet["C1"]["holds"] is True and resnet["C1_within"]["holds"] is False
    assert measure("local_losses", hp={"aux": "dgl"})["C1_head"]["holds"] is False
    assert measure("node_perturbation")["C1_head"]["holds"] is True
    assert measure("fa")["C1_head"]["holds"] is None and measure("fa", "resnet20")["C1_within"]["holds"] is True


def test_forward_reads_written_by_hand_must_be_marked(monkeypatch):
    """The perturbation rules multiply their readout's weights by the activity's change by hand; that forward read
    goes through forward_weight. Unmarked, the probe would see the readout's perturbed weights there: the head
    entry would fail, so the instrument does see reads it is not told are forward."""
    from bioplaus.algorithms import perturbation

    monkeypatch.setattr(perturbation, "forward_weight", lambda w: w)
    assert measure("node_perturbation")["C1_head"]["holds"] is False


def test_the_perturbation_must_be_large_to_see_sign_reads(monkeypatch):
    """sign(W) changes only where a perturbation crosses zero: at 1e-4 of the weight's norm sign-symmetry looks
    transport-free on this net, at the probe's size it does not (bp moves at any size)."""
    monkeypatch.setattr(transport, "RELATIVE_SIZE", 1e-4)
    assert measure("sign_symmetry")["C1"]["holds"] is True
    assert measure("bp")["C1"]["holds"] is False


def test_bp_violations_are_detected_by_every_probe():
    """Negative control: the probes see weight transport, chained errors, a backward sweep and label use in bp."""
    rows = measure("bp")
    assert [rows[c]["holds"] for c in ("C1", "C2", "C3", "C4")] == [False] * 4
    assert rows["C2"]["value"] == 2 and rows["C3"]["value"] == 2 and rows["C4"]["value"] == 2
    x, y = batch()
    assert probes.weight_reads(small_rule("bp"), x, y) == {1, 2}  # W2, W3 carry the error down; W1 has no input grad
    assert probes.gradient_crossings(small_rule("bp"), x, y) == {1, 2}
    assert probes.layer_calls(small_rule("bp"), x, y) == [1, 1, 1]
    assert probes.label_dependent_blocks(small_rule("bp"), x, y) == {0, 1}


def test_probes_pass_a_rule_that_trains_only_the_head():
    """Positive control for the probes: with hidden blocks frozen and detached, nothing crosses or is transported."""
    import torch.nn.functional as F

    def head_only(rule):
        def step(xb, yb):
            with torch.no_grad():
                h = xb
                for block in rule.net.blocks:
                    h = block(h)
            loss = F.cross_entropy(rule.net.head(h), yb)
            rule.opt.minimize(loss)
            return {"loss": loss}
        rule.train_step = step
        return rule

    cls, spec = load_rules()["bp"], ARCHS["mlp"]
    build = criteria.builder(cls, typed(cls.HParams, {}, "hp"), spec, typed(spec.config, SMALL["mlp"], "model"),
                             (1, 8, 8), 10)
    x, y = batch(8)
    rows = {m.criterion: m for m in criteria.measure(lambda: head_only(build()), x.double(), y)}
    assert all(rows[c].holds for c in ("C1", "C2", "C3", "C4")), rows
    rule = head_only(small_rule("bp"))
    x, y = batch()
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


def test_criteria_command_writes_the_table_and_exits_1_on_a_disagreement(tmp_path, capsys):
    """``bioplaus criteria``: one JSON row per cell x criterion with bp's value beside it, the Parquet table under
    out/criteria; a declared claim the measurement contradicts (dtp's C1 under top_target=gradient) exits 1."""
    import json

    import polars as pl

    from bioplaus.orchestrator.cli import main

    assert main(["criteria", "rules=[dfa]", "archs=[mlp,cnn]", f"out={tmp_path}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["arch"], r["criterion"]) for r in rows} >= {("mlp", "C1"), ("cnn", "C4")}
    c1 = next(r for r in rows if (r["arch"], r["criterion"]) == ("mlp", "C1"))
    assert c1["holds"] is True and c1["declared"] is True and c1["agree"] is True and c1["bp_value"] > 0.1
    table = pl.scan_parquet(tmp_path / "criteria").collect()
    assert table.height == len(rows) and set(table["arch"]) == {"mlp", "cnn"}
    assert main(["criteria", "rules=[dtp]", "archs=[mlp]", "hp.top_target=gradient", "--json"]) == 1
    wrong = [r for r in json.loads(capsys.readouterr().out) if r["agree"] is False]
    assert [r["criterion"] for r in wrong] == ["C1"]
    assert main(["criteria", "rules=[no_such_rule]"]) == 2
    assert "unknown rule or arch 'no_such_rule'" in capsys.readouterr().err
