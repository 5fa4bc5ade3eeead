"""LossOptions: the one object the loss hyper-parameters travel in, checked once, with errors that name
the argument; the modules keep theirs."""

import math

import pytest

from safedpo_kernels import LinearSafeDPOLoss, LossOptions, SafeDPOLoss


def test_defaults_are_the_specs():
    o = LossOptions()
    assert (o.beta, o.delta, o.swap, o.drop_both_unsafe, o.label_smoothing, o.loss_type, o.reduction, o.average) == (
        0.1, 10.0, True, True, 0.0, "sigmoid", "mean", False)
    assert LossOptions(beta=1, delta=0) == LossOptions(beta=1.0, delta=0.0)
    assert isinstance(LossOptions(beta=1).beta, float)
    assert LossOptions(swap=0).swap is False


@pytest.mark.parametrize("bad, name", [
    (dict(beta=0.0), "beta"), (dict(beta=math.inf), "beta"), (dict(beta="0.1"), "beta"), (dict(beta=True), "beta"),
    (dict(delta=-1.0), "delta"), (dict(delta=math.nan), "delta"),
    (dict(label_smoothing=0.6), "label_smoothing"), (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="dpo"), "loss_type"), (dict(reduction="avg"), "reduction"),
    (dict(swap="no"), "swap"), (dict(drop_both_unsafe=2), "drop_both_unsafe"), (dict(average=None), "average"),
])
def test_a_bad_value_is_named(bad, name):
    with pytest.raises(ValueError, match=name):
        LossOptions(**bad)


def test_replace_checks_again_and_modules_keep_their_options():
    o = LossOptions(beta=0.3, loss_type="hinge")
    assert o.replace(reduction="sum").reduction == "sum" and o.reduction == "mean"
    with pytest.raises(ValueError, match="reduction"):
        o.replace(reduction="none")
    assert SafeDPOLoss(beta=0.3, loss_type="hinge").options == o
    assert LinearSafeDPOLoss(beta=0.3, loss_type="hinge", average=True).options == o.replace(average=True)
    assert "loss_type='hinge'" in repr(SafeDPOLoss(beta=0.3, loss_type="hinge"))
    with pytest.raises(ValueError, match="swap"):
        SafeDPOLoss(swap="yes")


def test_numpy_flags_are_flags():
    np = pytest.importorskip("numpy")
    assert LossOptions(swap=np.bool_(False), average=np.bool_(True)) == LossOptions(swap=False, average=True)
