"""One optimisation space for every rule with an optimiser: each rule's search space includes
search_spaces/_optimiser.yaml, may set only its lr range itself, and every shared knob (the onecycle
schedule included) is implemented for every such rule; `bioplaus space` prints the effective spaces."""

from __future__ import annotations

import fnmatch
import json
import math
import shutil

import pytest
import torch

from bioplaus.algorithms.registry import get_rule, load_rules
from bioplaus.algorithms.rule import OptimHParams, ScheduledOptimizer, make_optimizer
from bioplaus.algorithms.schedules import SCHEDULES
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.search_space import (OPTIMISER_FRAGMENT, SEARCH_SPACES, load_fragment,
                                                 load_search_space, missing_shared_knobs)
from conftest import REPO, batch, small_rule

# The rules of the comparison (the tests' fault-injection rule lives elsewhere and keeps its tiny space).
RULES = [n for n, cls in load_rules().items() if cls.__module__.startswith("bioplaus.algorithms.rules.")]
WITH_OPTIMISER = [n for n in RULES if issubclass(get_rule(n).HParams, OptimHParams)]


def test_the_fragment_holds_every_shared_knob_and_only_lr_is_per_rule():
    specs, per_rule = load_fragment(SEARCH_SPACES / OPTIMISER_FRAGMENT)
    assert set(specs) == {"lr", "optimizer", "momentum", "weight_decay", "schedule"} and per_rule == {"lr"}
    assert set(specs["schedule"]["choices"]) == set(SCHEDULES) == {"constant", "cosine", "onecycle"}


@pytest.mark.parametrize("name", WITH_OPTIMISER)
def test_every_rule_with_an_optimiser_has_every_shared_knob(name):
    rule_cls = get_rule(name)
    space = load_search_space(rule_cls)
    assert not missing_shared_knobs(rule_cls, space), f"search_spaces/{name}.yaml must include {OPTIMISER_FRAGMENT}"
    bp = load_search_space(get_rule("bp"))
    for knob in ("optimizer", "momentum", "weight_decay", "schedule"):
        assert space[knob].describe() == bp[knob].describe(), knob  # the same range for every rule
    assert list(space)[:5] == ["lr", "optimizer", "momentum", "weight_decay", "schedule"]


def _spaces(tmp_path, bp_text: str):
    shutil.copy(SEARCH_SPACES / OPTIMISER_FRAGMENT, tmp_path / OPTIMISER_FRAGMENT)
    (tmp_path / "bp.yaml").write_text(bp_text)
    return tmp_path / "bp.yaml"


def test_a_space_without_the_fragment_is_reported(tmp_path):
    path = _spaces(tmp_path, "rule: bp\nparams:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
                             "  optimizer: {type: categorical, choices: [adam, sgd]}\n")
    space = load_search_space(get_rule("bp"), path)
    assert missing_shared_knobs(get_rule("bp"), space, tmp_path) == ["optimizer", "momentum", "weight_decay",
                                                                      "schedule"]


def test_a_rule_may_set_its_lr_range_but_no_other_shared_knob(tmp_path):
    path = _spaces(tmp_path, "rule: bp\ninclude: _optimiser.yaml\n"
                             "params: {lr: {type: loguniform, low: 1.0e-5, high: 1.0e-1}}\n")
    space = load_search_space(get_rule("bp"), path)
    assert (space["lr"].low, space["lr"].source, space["schedule"].source) == (1e-5, "bp.yaml", OPTIMISER_FRAGMENT)
    path.write_text("rule: bp\ninclude: _optimiser.yaml\nparams: {schedule: {type: categorical, choices: [cosine]}}\n")
    with pytest.raises(UsageError, match=f"{path}: params.schedule is shared by every rule through _optimiser.yaml"):
        load_search_space(get_rule("bp"), path)


BAD_INCLUDES = [
    ("rule: bp\ninclude: _nothing.yaml\nparams: {}", "include: no fragment '_nothing.yaml'"),
    ("rule: bp\ninclude: fa.yaml\nparams: {}", "include: 'fa.yaml' is not a fragment name"),
    ("rule: bp\ninclude: ../_optimiser.yaml\nparams: {}", "is not a fragment name"),
    ("rule: bp\ninclude: {a: 1}\nparams: {}", "include must be a fragment's file name or a list"),
    ("rule: bp\nincludes: _optimiser.yaml\nparams: {}", "unknown top-level keys ['includes']"),
]


@pytest.mark.parametrize("text,message", BAD_INCLUDES, ids=[m for _, m in BAD_INCLUDES])
def test_bad_includes_are_refused_naming_the_file(tmp_path, text, message):
    path = _spaces(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load_search_space(get_rule("bp"), path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_bad_fragment_is_refused_naming_the_fragment_and_key(tmp_path):
    path = _spaces(tmp_path, "rule: bp\ninclude: _optimiser.yaml\nparams: {}")
    (tmp_path / OPTIMISER_FRAGMENT).write_text("params: {lr: {type: loguniform, low: 0, high: 1}}\n")
    with pytest.raises(UsageError, match="_optimiser.yaml: params.lr .*loguniform needs low > 0"):
        load_search_space(get_rule("bp"), path)


def test_fragments_are_package_data_and_never_a_rules_space():
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(OPTIMISER_FRAGMENT, g) for g in globs["bioplaus.search_spaces"])
    files = {p.stem for p in SEARCH_SPACES.glob("*.yaml") if not p.name.startswith("_")}
    assert files == set(RULES) | {"faulty"}
    assert not [r for r in load_rules() if r.startswith("_")]


def _optimisers(rule) -> list[ScheduledOptimizer]:
    found = []
    for value in vars(rule).values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, ScheduledOptimizer):
                found.append(v)
    return found


@pytest.mark.parametrize("name", WITH_OPTIMISER)
def test_onecycle_is_implemented_for_every_rule_with_an_optimiser(name):
    hp = {"schedule": "onecycle", "lr": 1e-3, **({"readout": "delta"} if name == "stdp" else {})}
    rule = small_rule(name, hp=hp, steps_per_epoch=10, epochs=1)
    opts = _optimisers(rule)
    assert opts and all(o.scheduler is not None for o in opts)
    assert all(math.isclose(g["lr"], g["initial_lr"] / 25) for o in opts for g in o.param_groups)
    x, y = batch()
    rule.train_step(x, y)


def test_onecycle_warms_up_then_anneals_and_holds_past_the_end():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], OptimHParams(lr=1e-2, schedule="onecycle"), total_steps=100)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    assert math.isclose(lrs[0], 1e-2 / 25) and math.isclose(max(lrs), 1e-2) and lrs.index(max(lrs)) == 30
    assert all(a <= b for a, b in zip(lrs[:30], lrs[1:31])) and all(a >= b for a, b in zip(lrs[30:100], lrs[31:101]))
    assert math.isclose(lrs[100], 1e-2 / 25e4) and lrs[119] == lrs[100]


def test_the_space_command_prints_every_rules_effective_space(capsys):
    from bioplaus.orchestrator.cli import main

    assert main(["space", "--json"]) == 0
    spaces = json.loads(capsys.readouterr().out)
    assert set(spaces) == set(load_rules())
    shared = {n: {k: spaces[n][k] for k in ("optimizer", "momentum", "weight_decay", "schedule")}
              for n in WITH_OPTIMISER}
    assert len({json.dumps(v, sort_keys=True) for v in shared.values()}) == 1
    assert shared["bp"]["schedule"] == {"type": "categorical", "choices": ["constant", "cosine", "onecycle"],
                                        "source": OPTIMISER_FRAGMENT}
    assert main(["space", "bp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "bp" and "onecycle" in next(ln for ln in lines if "schedule" in ln)
    assert main(["space", "nope"]) == 2
    assert "unknown rule 'nope'" in capsys.readouterr().err
