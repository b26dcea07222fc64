"""Block-local rules: local_losses, ff, softhebb.

* the block-local step, driven stage by stage, gives exactly the update of the whole-network step, and
  each block step changes only its own stage;
* forward-forward never builds a negative sample with the true label;
* the plausibility claims these rules prove here (the probes in algorithms/probes.py see only autograd,
  and SoftHebb computes its updates by hand), each with bp as the negative control:
  - no block's update depends on any later block (C1/C2): re-drawing the weights of every later
    stage leaves a block's update unchanged; in bp it changes it;
  - single phase (C3): every weight layer evaluated once, on the batch itself (n rows), and nothing
    from later blocks; bp fails on the second condition, ff on the first (its negative-data pass);
  - SoftHebb's hidden blocks use no label and no error (C4); bp's do;
* each rule beats chance by a wide margin on ``digits`` within seconds.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from bioplaus.algorithms import probes
from bioplaus.algorithms.rule import Rule
from bioplaus.orchestrator.config import parse_overrides
from bioplaus.orchestrator.trial import load_splits, resolve, run_trial
from conftest import batch, small_rule

LOCAL = ("local_losses", "ff", "softhebb")
VARIANTS = [  # (rule, arch, hp): every code path of block_step
    ("local_losses", "mlp", {}), ("local_losses", "cnn", {}),
    ("local_losses", "mlp", {"aux": "dgl", "loss": "pred"}), ("local_losses", "cnn", {"aux": "dgl", "loss": "sim"}),
    ("local_losses", "deep_cnn", {}),
    ("ff", "mlp", {}), ("ff", "cnn", {}), ("ff", "mlp", {"readout": "goodness", "loss": "symba"}),
    ("ff", "cnn", {"readout": "goodness", "embed": "pixels"}), ("ff", "mlp", {"negatives": 3, "loss": "symba"}),
    ("ff", "cnn", {"negatives": 2, "readout": "goodness"}), ("ff", "cnn", {"negatives": 2, "goodness": "position"}),
    ("softhebb", "mlp", {}), ("softhebb", "cnn", {}), ("softhebb", "mlp", {"activation": "arch", "optimizer": "sgd"}),
    ("softhebb", "cnn", {"readout_dropout": 0.5}),
]


def _id(v):
    return f"{v[0]}-{v[1]}-" + ",".join(f"{k}={x}" for k, x in v[2].items())


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread (these nets are tiny, and two threads crawl on a loaded 2-core machine); restore after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "train.threads=1"
    torch.set_num_threads(threads)


def _params(rule: Rule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rule.state_dict().items()}


def _owned(rule: Rule, index: int) -> list[str]:
    """state_dict key prefixes of stage ``index``: its block, then (local_losses) its auxiliary heads."""
    keys = [f"net.{'head' if index == len(rule.net.blocks) else f'blocks.{index}'}."]
    if hasattr(rule, "aux") and index < len(rule.aux):
        keys.append(f"aux.{index}.")
    return keys


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_block_steps_equal_train_step(variant):
    """Driving block_step over net.stages (as the layer-parallel pipeline will) == train_step, for two steps."""
    name, arch, hp = variant
    shape = (3, 8, 8) if arch == "deep_cnn" else (1, 8, 8)
    rule = small_rule(name, arch=arch, hp=hp, input_shape=shape)
    whole, staged = copy.deepcopy(rule), copy.deepcopy(rule)
    before = _params(rule)
    for step in range(2):
        x, y = batch(input_shape=shape, seed=step)
        whole.train_step(x, y)
        h = x
        for index in range(len(staged.net.stages)):
            h = staged.block_step(index, h, y)
            assert not h.requires_grad, "block_step must return a detached output"
    a, b = _params(whole), _params(staged)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between train_step and the staged block steps"
    changed = [k for k in a if not torch.equal(a[k], before[k])]
    assert any(k.startswith("net.blocks.0.layer.weight") for k in changed), "the first block did not learn"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[1] != "deep_cnn"], ids=_id)
def test_block_step_changes_only_its_own_stage(variant):
    """A block step updates its own stage's state and nothing else (a pipeline worker owns one stage)."""
    name, arch, hp = variant
    rule = small_rule(name, arch=arch, hp=hp)
    x, y = batch()
    h = x
    for index in range(len(rule.net.stages)):
        before = _params(rule)
        h = rule.block_step(index, h, y)
        after = _params(rule)
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        foreign = {k for k in changed if not any(k.startswith(p) for p in _owned(rule, index))}
        assert not foreign, f"block_step({index}) changed state of other stages: {sorted(foreign)}"
        trains_head = not (name == "ff" and hp.get("readout", "linear") == "goodness")
        if index < len(rule.net.blocks) or trains_head:
            layer_key = _owned(rule, index)[0] + "layer.weight"
            assert layer_key in changed, f"block_step({index}) did not update its own weights"


# --- forward-forward negative data ---------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_ff_negative_label_is_never_the_true_one(classes):
    """Property: over many batches and seeds, every negative label differs from the true one, and every
    wrong class is used (uniform over the C-1 wrong labels)."""
    for seed in range(5):
        rule = small_rule("ff", num_classes=classes, seed=seed)
        counts = torch.zeros(classes, classes)
        for step in range(20):
            y = torch.randint(0, classes, (256,), generator=torch.Generator().manual_seed(100 * seed + step))
            (neg,) = rule.negative_labels(y)  # hp.negatives=1: one row of wrong labels
            assert (neg != y).all() and neg.min() >= 0 and neg.max() < classes
            counts.index_put_((y, neg), torch.ones(len(y)), accumulate=True)
        off_diag = counts[~torch.eye(classes, dtype=torch.bool)]
        assert counts.diag().sum() == 0 and (off_diag > 0).all()


@pytest.mark.parametrize("classes,k", [(3, 2), (10, 3), (10, 9)])
def test_ff_several_negatives_are_distinct_wrong_labels(classes, k):
    """Property: with hp.negatives=k every sample gets k wrong labels, all different (k = C-1: exactly the
    C-1 wrong ones), and every wrong class is used."""
    rule = small_rule("ff", num_classes=classes, hp={"negatives": k})
    for step in range(10):
        y = torch.randint(0, classes, (256,), generator=torch.Generator().manual_seed(step))
        neg = rule.negative_labels(y)
        assert neg.shape == (k, len(y)) and (neg != y).all() and neg.min() >= 0 and neg.max() < classes
        assert (neg.sort(0).values.diff(dim=0) > 0).all(), "a sample got the same wrong label twice"
        assert set(neg.flatten().tolist()) == set(range(classes))
        if k == classes - 1:
            assert (neg.sum(0) + y == classes * (classes - 1) // 2).all()


def test_ff_too_many_negatives_is_refused():
    """Asking for more wrong labels than exist is an error naming both numbers, not a silent repeat."""
    with pytest.raises(ValueError, match="negatives=4: only 3 wrong labels exist with 4 classes"):
        small_rule("ff", num_classes=4, hp={"negatives": 4})


def test_ff_softmax_loss_over_negatives():
    """loss=symba with k negatives is -log softmax(alpha * G) of the positive among its k+1 copies; with k = 1
    it is SymBa's softplus(-alpha (G+ - G-)). loss=threshold averages the k negative terms."""
    n, k, alpha, theta = 5, 3, 4.0, 2.0
    h = torch.rand((k + 1) * n, 7, generator=torch.Generator().manual_seed(0))
    g = h.pow(2).mean(1).view(k + 1, n)
    rule = small_rule("ff", hp={"negatives": k, "loss": "symba", "alpha": alpha})
    expected = -torch.log_softmax(alpha * g, 0)[0].mean()
    assert torch.allclose(rule.ff_loss(h, n), expected)
    one = small_rule("ff", hp={"negatives": 1, "loss": "symba", "alpha": alpha})
    assert torch.allclose(one.ff_loss(h[:2 * n], n), -torch.log_softmax(alpha * g[:2], 0)[0].mean())
    thr = small_rule("ff", hp={"negatives": k, "loss": "threshold", "alpha": alpha, "theta": theta})
    sp = torch.nn.functional.softplus
    assert torch.allclose(thr.ff_loss(h, n), (sp(-alpha * (g[0] - theta)) + sp(alpha * (g[1:] - theta)).mean(0)).mean())


def test_ff_position_goodness_contrasts_each_position():
    """hp.goodness=position on a conv output: one goodness per spatial position (mean square over channels), each
    position its own softmax over the copies, averaged; it differs from the layer-wide loss, and on a flat (mlp)
    output the two are the same."""
    n, k, alpha = 4, 2, 3.0
    h = torch.rand((k + 1) * n, 6, 3, 5, generator=torch.Generator().manual_seed(1))
    pos = small_rule("ff", arch="cnn", hp={"negatives": k, "loss": "symba", "alpha": alpha, "goodness": "position"})
    g = h.pow(2).mean(1).view(k + 1, n, 15)
    assert torch.allclose(pos.ff_loss(h, n), -torch.log_softmax(alpha * g, 0)[0].mean())
    layer = small_rule("ff", arch="cnn", hp={"negatives": k, "loss": "symba", "alpha": alpha})
    assert not torch.allclose(layer.ff_loss(h, n), pos.ff_loss(h, n))
    flat = h.flatten(1)
    assert torch.equal(pos.ff_loss(flat, n), layer.ff_loss(flat, n))


@pytest.mark.parametrize("k", [1, 3])
def test_ff_training_step_embeds_a_wrong_label_in_every_negative_sample(k):
    """The labels actually embedded by a training step: the true one in the positive copy, a wrong one in each of
    the k negative copies (k different ones per sample), for every sample (not just what negative_labels returns)."""
    rule = small_rule("ff", hp={"negatives": k})
    embedded = []
    original = rule.embed

    def spy(x, labels):
        embedded.append(None if labels is None else labels.clone())
        return original(x, labels)

    rule.embed = spy
    for step in range(10):
        x, y = batch(seed=step)
        embedded.clear()
        rule.train_step(x, y)
        pos, *negs, neutral = embedded  # the linear readout's neutral copy carries no label
        assert torch.equal(pos, y) and len(negs) == k and neutral is None
        assert all((neg != y).all() for neg in negs)
        assert (torch.stack(negs).sort(0).values.diff(dim=0) > 0).all()


# --- criteria: instruments ------------------------------------------------------------------------
def _later_dependent_blocks(rule: Rule, x: torch.Tensor, y: torch.Tensor) -> set[int]:
    """Hidden blocks whose one-step update changes when the weights of every later stage are re-drawn."""
    dependent = set()
    for i in range(len(rule.net.blocks)):
        results = []
        for redraw in (False, True):
            clone = copy.deepcopy(rule)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                if redraw:
                    with torch.no_grad():
                        for stage in clone.net.stages[i + 1:]:
                            stage.layer.weight.copy_(torch.randn_like(stage.layer.weight) * stage.layer.weight.std())
                clone.train_step(x, y)
            results.append(torch.cat([p.detach().flatten() for p in clone.net.blocks[i].parameters()]))
        if not torch.equal(*results):
            dependent.add(i)
    return dependent


def _single_phase(name: str, arch: str = "mlp") -> bool:
    """C3 as measured: each weight layer evaluated exactly once, on the n samples of the batch (no extra copy
    of the data such as a negative pass), and no block's update depends on later blocks (no backward sweep)."""
    x, y = batch()
    rows = probes.layer_call_rows(small_rule(name, arch=arch), x, y)
    once = all(r == [len(y)] for r in rows)
    return once and not _later_dependent_blocks(small_rule(name, arch=arch), x, y)


# --- criteria: proofs -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_no_dependence_on_later_blocks(arch):
    """C1 and C2: no block's update uses any later block's weights (so no transport of them and no error
    chained through them). Negative control: the instrument sees bp's hidden blocks depend on later weights."""
    x, y = batch()
    assert _later_dependent_blocks(small_rule("bp", arch=arch), x, y) == set(range(len(small_rule("bp", arch=arch).net.blocks)))
    for name in LOCAL:
        assert _later_dependent_blocks(small_rule(name, arch=arch), x, y) == set(), name


def test_single_phase_and_no_dependence_on_later_blocks():
    """C3 for local_losses and softhebb (true) and ff (false, its negative pass); bp is the negative control."""
    assert not _single_phase("bp")  # backward sweep: hidden updates depend on later blocks
    assert not _single_phase("ff")  # negative-data pass: every hidden layer runs on 2n samples
    for name in ("local_losses", "softhebb"):
        for arch in ("mlp", "cnn"):
            assert _single_phase(name, arch), f"{name} on {arch}"


@pytest.mark.parametrize("readout,copies", [("goodness", 2), ("linear", 3)])
def test_ff_negative_pass_is_a_second_phase(readout, copies):
    """ff's C3=False: every hidden layer is evaluated on the positive batch *and* a negative copy with wrong
    labels embedded (plus a neutral copy for the linear readout), and the update needs the negative copy:
    remove it (negative goodness no longer counted) and the update changes. The same instrument passes
    local_losses (n rows, once), so it is not blind: see test_single_phase_and_no_dependence_on_later_blocks."""
    x, y = batch()
    rule = small_rule("ff", hp={"readout": readout})
    rows = probes.layer_call_rows(copy.deepcopy(rule), x, y)
    assert all(r == [copies * len(y)] for r in rows[:-1])
    assert not _single_phase("ff")

    positive_only = copy.deepcopy(rule)
    positive_only.ff_loss = lambda h, n: positive_only.__class__.ff_loss(
        positive_only, torch.cat([h[:n], h[:n].detach() * 0]), n)
    full = copy.deepcopy(rule)
    full.train_step(x, y)
    positive_only.train_step(x, y)
    assert not torch.equal(full.net.blocks[0].layer.weight, positive_only.net.blocks[0].layer.weight)


def test_softhebb_hidden_blocks_use_no_label_and_no_error():
    """C4: SoftHebb's hidden updates are the same whatever the labels (shifted or random) and whatever the
    readout's weights (so no error from the top reaches them); a hidden block step never reads y at all.
    Negative control: bp's hidden updates change with the labels."""
    x, y = batch()
    assert probes.label_dependent_blocks(small_rule("bp"), x, y) == {0, 1}
    for arch in ("mlp", "cnn"):
        rule = small_rule("softhebb", arch=arch)
        assert probes.label_dependent_blocks(rule, x, y) == set()
        random_labels = torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(7))
        a, b = copy.deepcopy(rule), copy.deepcopy(rule)
        a.train_step(x, y)
        b.train_step(x, random_labels)
        for i in range(len(rule.net.blocks)):
            assert torch.equal(a.net.blocks[i].layer.weight, b.net.blocks[i].layer.weight)
        assert not torch.equal(a.net.head.layer.weight, b.net.head.layer.weight)  # the readout does use labels
        h = x
        for i in range(len(rule.net.blocks)):
            h = rule.block_step(i, h, None)  # no label given: the hidden step cannot be using one
    assert _later_dependent_blocks(small_rule("softhebb"), x, y) == set()


def test_softhebb_plastic_epochs_freeze_the_hidden_blocks_not_the_readout():
    """hp.plastic_epochs=0.5 of 4 steps per epoch: Hebbian updates for 2 presentations, then only the readout."""
    rule = small_rule("softhebb", hp={"plastic_epochs": 0.5}, steps_per_epoch=4)
    hidden, head = [], []
    for step in range(4):
        rule.train_step(*batch(seed=step))
        hidden.append([b.layer.weight.clone() for b in rule.net.blocks])
        head.append(rule.net.head.layer.weight.clone())
    changed = [any(not torch.equal(a, b) for a, b in zip(hidden[i], hidden[i + 1])) for i in range(3)]
    assert changed == [True, False, False]  # step 2 still plastic; steps 3 and 4 frozen
    assert all(not torch.equal(head[i], head[i + 1]) for i in range(3))
    assert rule.plastic.counts == [2] * len(rule.net.blocks)


def test_softhebb_readout_dropout_reaches_the_readout_only_and_never_predict():
    """hp.readout_dropout changes the readout's update, not the hidden blocks' (they never see it); predict and
    a rule rebuilt with the same seed are deterministic."""
    plain, dropped, again = (small_rule("softhebb", arch="cnn", hp={"readout_dropout": p}) for p in (0.0, 0.5, 0.5))
    x, y = batch()
    assert torch.equal(plain.predict(x), dropped.predict(x))  # same seed, same weights: dropout is not in predict
    for rule in (plain, dropped, again):
        rule.train_step(x, y)
    for a, b in zip(plain.net.blocks, dropped.net.blocks):
        assert torch.equal(a.layer.weight, b.layer.weight)
    assert not torch.equal(plain.net.head.layer.weight, dropped.net.head.layer.weight)
    assert torch.equal(dropped.net.head.layer.weight, again.net.head.layer.weight)
    assert torch.equal(dropped.predict(x), dropped.predict(x))


# --- learning on digits ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_splits(parse_overrides(["dataset=digits"]))




LEARN = [  # small nets, a few hundred steps at most
    ("local_losses", "mlp", 0.80, ["model.widths=[64,64]", "hp.lr=3e-3", "train.epochs=5"]),
    ("local_losses", "cnn", 0.75, ["model.channels=[8,16]", "hp.lr=3e-3", "train.epochs=5", "train.batch_size=32"]),
    ("ff", "mlp", 0.70, ["model.widths=[128,128]", "hp.lr=3e-3", "train.epochs=5", "train.batch_size=32"]),
    ("ff", "cnn", 0.60, ["model.channels=[16,32]", "hp.lr=3e-3", "train.epochs=5", "train.batch_size=32"]),
    ("softhebb", "mlp", 0.85, ["model.widths=[256]", "hp.hebb_lr=0.5", "hp.triangle_power=3", "train.epochs=8"]),
    ("softhebb", "cnn", 0.80, ["model.channels=[16,32]", "hp.lr=1e-2", "train.epochs=3"]),
]


@pytest.mark.parametrize("name,arch,floor,overrides", LEARN, ids=[f"{c[0]}-{c[1]}" for c in LEARN])
def test_beats_chance_on_digits(digits, one_thread, name, arch, floor, overrides):
    """Chance is 0.10; each rule must reach ``floor`` on the test split within a few seconds of training."""
    cfg = parse_overrides([f"rule={name}", f"arch={arch}", "dataset=digits", "out=null", one_thread, *overrides])
    cpu = time.process_time()
    record = run_trial(resolve(cfg), splits=digits)
    cpu = time.process_time() - cpu
    assert record["status"] == "ok", record.get("traceback")
    assert record["test_acc"] > floor and record["val_acc"] > floor, record["test_acc"]
    assert cpu < 60  # CPU seconds, not wall: processes beside this one stretch the wall time, not the work
