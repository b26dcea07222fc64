"""The architecture grid: a deep CNN whose norm is a choice, the rules it opens, and ResNet-20/18.

Every new cell learns on the 8x8 digits (loss falls, accuracy well above chance in two epochs at small
widths); each rule runs with its own per-architecture defaults (``Rule.arch_defaults``); a norm a rule's
math forbids is refused before training; the ResNets have He et al.'s shapes and split at residual
blocks; FA's C1 holds on residual blocks (projections included) with bp as the control.
"""

from __future__ import annotations

import pytest
import torch

from bioplaus.algorithms import probes
from bioplaus.algorithms.arch import ARCHS
from bioplaus.algorithms.registry import load_rules
from bioplaus.algorithms.resnet import ResidualBlock
from bioplaus.orchestrator.config import parse_overrides, typed
from bioplaus.orchestrator.errors import UsageError
from bioplaus.orchestrator.trial import resolve, run_trial
from conftest import batch, small_rule

DEEP_CNN_RULES = ["dtp", "ep", "pc", "ff", "softhebb"]
RESNET_RULES = ["bp", "fa", "dfa", "sign_symmetry", "local_losses", "pc"]
NEW_CELLS = ([(r, "deep_cnn") for r in DEEP_CNN_RULES] + [(r, "resnet20") for r in RESNET_RULES]
             + [("bp", "resnet18"), ("fa", "resnet18")])
RESNET = ["model.channels=[8,16]", "hp.lr=1e-2", "train.epochs=3"]
# Per-cell settings of the learning check (the rules' tuned recipes are their bench cases; these only show learning).
EXTRA = {("dtp", "deep_cnn"): ["model.activation=tanh", "model.channels=[8,8,16,16]"],
         # 3 epochs of the 1,000 images: 2 epochs of 400 (26 steps) were too few to leave chance (val 0.125)
         ("ep", "deep_cnn"): ["hp.free_steps=10", "hp.nudged_steps=4", "hp.lr=3e-3", "train.epochs=3"],
         ("pc", "deep_cnn"): ["hp.lr=3e-3"], ("softhebb", "deep_cnn"): ["hp.lr=1e-2", "train.epochs=3"],
         ("ff", "deep_cnn"): ["model.channels=[16,16,32,32]", "train.epochs=3"],
         **{(r, a): RESNET for r in RESNET_RULES for a in ("resnet20", "resnet18")},
         # DFA's alignment phase takes two epochs before the loss falls (val 0.49 after 4 epochs, 0.58 after 5)
         ("dfa", "resnet20"): ["model.channels=[8,16]", "hp.lr=1e-2", "train.epochs=5"],
         # lr 1e-2 diverges; 8 inference steps instead of 20 keep the check short (val 0.59 against 0.68)
         ("pc", "resnet20"): ["model.channels=[8,16]", "hp.lr=3e-3", "hp.inference_steps=8"]}
# Cells that run but were not seen to learn in this budget: an open question, not a passing claim.
NOT_YET_LEARNING: dict[tuple[str, str], str] = {}

def trial(*overrides):
    return run_trial(resolve(parse_overrides(["smoke=true", "data.train_limit=1000", "train.epochs=2",
                                              "train.batch_size=32", *overrides])))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,arch", [
    pytest.param(n, a, marks=pytest.mark.xfail(reason=NOT_YET_LEARNING[(n, a)], strict=False))
    if (n, a) in NOT_YET_LEARNING else (n, a) for n, a in NEW_CELLS])
def test_new_cell_learns(name, arch):
    record = trial(f"rule={name}", f"arch={arch}", *EXTRA.get((name, arch), []))
    assert record["status"] == "ok", record.get("traceback")
    losses = [e["train_loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0], losses
    assert record["val_acc"] > 0.3 and record["test_acc"] > 0.3, (record["val_acc"], record["test_acc"])


def test_paper_preset_lists_every_cell_and_a_reason_for_each_unsupported_one():
    from bioplaus.orchestrator.sweep import parse_sweep, plan_cells

    cells, skipped = plan_cells(parse_sweep(["preset=paper", "optional_datasets=[]"]))
    runnable = {(c.rule, c.arch) for c in cells}
    assert {(r, "deep_cnn") for r in DEEP_CNN_RULES} <= runnable
    assert {(r, a) for r in RESNET_RULES for a in ("resnet20", "resnet18")} <= runnable
    assert ("stdp", "cnn") in runnable  # convolutional STDP
    assert skipped and all(why and len(why) > 20 for _, why in skipped)


def test_rule_defaults_pick_the_norm_and_forbidden_norms_are_refused():
    spec = resolve(parse_overrides(["rule=pc", "arch=deep_cnn", "smoke=true"]))
    assert spec.model_cfg.norm == "none" and spec.cfg.model.norm == "none"  # recorded as trained
    assert resolve(parse_overrides(["rule=bp", "arch=deep_cnn"])).model_cfg.norm == "batch"  # unchanged default
    assert resolve(parse_overrides(["rule=pc", "arch=deep_cnn", "model.norm=group"])).model_cfg.norm == "group"
    with pytest.raises(UsageError, match="cannot use model.norm=batch"):
        resolve(parse_overrides(["rule=dtp", "arch=deep_cnn", "model.norm=batch"]))
    with pytest.raises(UsageError, match="cannot use model.norm=layer"):
        resolve(parse_overrides(["rule=ep", "arch=cnn", "model.norm=layer"]))


@pytest.mark.parametrize("norm,kind", [("group", torch.nn.GroupNorm), ("layer", torch.nn.GroupNorm),
                                       ("batch", torch.nn.BatchNorm2d)])
def test_deep_cnn_norm_is_a_choice(norm, kind):
    spec = ARCHS["deep_cnn"]
    net = spec.build(typed(spec.config, {"norm": norm, "channels": [16, 16]}, "model"), (3, 8, 8), 10)
    assert all(isinstance(b.norm, kind) for b in net.blocks)
    if norm == "group":
        assert net.blocks[0].norm.num_groups == 8
    x = torch.randn(4, 3, 8, 8)
    assert net(x).shape == (4, 10)


def test_resnets_have_he_et_al_shapes():
    for arch, blocks, params in (("resnet20", 1 + 9, (0.26e6, 0.28e6)), ("resnet18", 1 + 8, (11.1e6, 11.2e6))):
        spec = ARCHS[arch]
        net = spec.build(typed(spec.config, {}, "model"), (3, 32, 32), 10)
        assert len(net.blocks) == blocks and all(isinstance(b, ResidualBlock) for b in net.blocks[1:])
        assert params[0] < sum(p.numel() for p in net.parameters()) < params[1]
    net = ARCHS["resnet20"].build(typed(ARCHS["resnet20"].config, {}, "model"), (3, 32, 32), 10)
    n_convs = sum(len(b.weight_layers()) for b in net.stages)
    assert n_convs == 20 + 2  # 19 convs + the linear head, plus the two stride-2 projections
    assert net.shapes()[-2] == (64, 8, 8)


def test_a_residual_block_is_one_pipeline_stage():
    from bioplaus.orchestrator.pipeline import count_stages

    spec = ARCHS["resnet20"]
    cfg = typed(spec.config, {}, "model")
    assert count_stages(cfg) == len(spec.build(cfg, (3, 32, 32), 10).stages) == 11


@pytest.mark.parametrize("name", ["fa", "dfa"])
def test_c1_no_weight_transport_on_residual_blocks(name):
    x, y = batch(input_shape=(3, 8, 8))
    assert probes.weight_reads(small_rule("bp", "resnet20", input_shape=(3, 8, 8)), x, y), "bp reads W^T"
    rule = small_rule(name, "resnet20", input_shape=(3, 8, 8))
    assert any(b.proj is not None for b in rule.net.blocks if isinstance(b, ResidualBlock))  # a projection is probed
    assert probes.weight_reads(rule, x, y) == set()


@pytest.mark.parametrize("name", RESNET_RULES)
def test_generic_criteria_probes_agree_with_the_claims_on_resnet20(name):
    """Every claim a ResNet rule proves with the generic probes also holds, as declared, on residual blocks; bp
    (every criterion false) is the control on which each probe must see the violation."""
    from test_criteria import GENERIC, measured

    claims = {c: k for c, k in load_rules()[name].criteria.items() if k.test.startswith(GENERIC)}
    assert claims or name not in ("bp", "pc"), name
    for code, claim in claims.items():
        if (name, code) == ("local_losses", "C1"):
            continue  # transport inside a residual block: measured exactly in the test below
        assert measured(code, name, "resnet20", (3, 8, 8)) == claim.holds, (name, code)


def test_local_losses_transports_weights_only_inside_a_residual_block():
    """local_losses on a ResNet: the aux head's error reaches a residual block's first conv through the block's
    own second conv (autograd inside the block), so the C1 probe sees the hidden blocks' own weights read (the
    stem's too: autograd's conv node saves its weight even where no input gradient is computed) and never the
    output block's; no gradient crosses from a block to the one below (C2 holds). On the mlp no weight is read."""
    x, y = batch(input_shape=(3, 8, 8))
    rule = small_rule("local_losses", "resnet20", input_shape=(3, 8, 8))
    assert any(isinstance(b, ResidualBlock) for b in rule.net.blocks)
    assert probes.weight_reads(rule, x, y) == set(range(len(rule.net.blocks)))
    assert probes.gradient_crossings(small_rule("local_losses", "resnet20", input_shape=(3, 8, 8)), x, y) == set()
    assert probes.weight_reads(small_rule("local_losses"), *batch()) == set()


def test_sign_symmetry_reads_signs_on_residual_blocks_and_fa_with_b_equal_w_is_bp():
    x, y = batch(input_shape=(3, 8, 8))
    assert probes.weight_reads(small_rule("sign_symmetry", "resnet20", input_shape=(3, 8, 8)), x, y) == set()
    bp, fa = (small_rule(n, "resnet20", input_shape=(3, 8, 8), model={"norm": "none"}) for n in ("bp", "fa"))
    fa.net.load_state_dict(bp.net.state_dict())
    for i, stage in enumerate(fa.net.stages):  # B = W everywhere, projections included
        for j, (layer, _) in enumerate(stage.weight_layers()):
            fb = fa.feedbacks(i)[j]
            if fb is not None:
                fb.copy_(layer.weight)
    bp.opt.zero_grad()
    torch.nn.functional.cross_entropy(bp.net(x), y).backward()
    fa.gradients(x, y)
    for p, q in zip(bp.net.parameters(), fa.net.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_unsupported_resnet_cells_say_why():
    for name, cls in load_rules().items():
        if not cls.__module__.startswith("bioplaus.algorithms.rules."):
            continue  # test-only rules (the fault injector) declare the mlp alone
        for arch in ("resnet20", "resnet18"):
            assert arch in cls.archs, f"{name} does not declare {arch}"
            assert name in RESNET_RULES or cls.archs[arch], name


def test_rule_hparams_per_architecture_are_defaults_the_run_can_override_and_the_record_keeps():
    ff = resolve(parse_overrides(["rule=ff", "arch=deep_cnn", "smoke=true"]))
    assert (ff.hp.loss, ff.hp.alpha, ff.hp.goodness) == ("symba", 4.0, "position")
    assert ff.cfg.hp.loss == "symba"  # recorded as trained
    assert resolve(parse_overrides(["rule=ff", "arch=deep_cnn", "hp.loss=threshold"])).hp.loss == "threshold"
    assert resolve(parse_overrides(["rule=ff", "arch=cnn"])).hp.loss == "threshold"  # Hinton's elsewhere
    assert resolve(parse_overrides(["rule=dfa", "arch=resnet20"])).hp.feedback_layout == "shared"
    assert resolve(parse_overrides(["rule=dfa", "arch=cnn"])).hp.feedback_layout == "dense"
    from bioplaus.orchestrator.search_space import defaults_in_space, load_search_space

    ff_cls = load_rules()["ff"]  # a sweep's first point on deep_cnn is the rule's deep_cnn defaults
    assert defaults_in_space(ff_cls, load_search_space(ff_cls), "deep_cnn")["loss"] == "symba"
    assert defaults_in_space(ff_cls, load_search_space(ff_cls), "cnn")["loss"] == "threshold"
    with pytest.raises(UsageError, match="feedback_layout='wide' is not one of dense, shared"):
        resolve(parse_overrides(["rule=dfa", "arch=resnet20", "hp.feedback_layout=wide"]))


def test_dfa_shared_feedback_is_what_global_pooling_hands_the_last_residual_block():
    """Through global average pooling, bp gives every position of the last block's map the same error, e W / (H W):
    DFA's shared layout with B = W_head / (H W) (and B = W inside the block) updates that block exactly as bp."""
    x, y = batch(input_shape=(3, 8, 8))
    bp, dfa = (small_rule(n, "resnet20", input_shape=(3, 8, 8), model={"norm": "none"}) for n in ("bp", "dfa"))
    assert dfa.hp.feedback_layout == "shared"
    dfa.net.load_state_dict(bp.net.state_dict())
    last = len(dfa.net.blocks) - 1
    _, height, width = dfa.block_shapes[last]
    with torch.no_grad():  # plain copies: the feedback must not join the graph of the weights it copies
        getattr(dfa, f"feedback_{last}").copy_(dfa.net.head.layer.weight / (height * width))
        getattr(dfa, f"inner_feedback_{last}_1").copy_(dfa.net.blocks[last].conv2.weight)
    bp.opt.zero_grad()
    torch.nn.functional.cross_entropy(bp.net(x), y).backward()
    dfa.gradients(x, y)
    compared = 0
    for (name, p), q in zip(bp.net.named_parameters(), dfa.net.parameters()):
        if name.startswith((f"blocks.{last}.", "head.")):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
            compared += 1
    assert compared >= 4  # conv1, conv2, the projection and the head
