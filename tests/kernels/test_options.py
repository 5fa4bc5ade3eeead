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


def test_option_objects_hold_no_shared_default_instances():
    """Every public call builds its option objects, inside compiled steps too. Dynamo cannot trace a
    dataclass whose __init__ defaults hold an instance of a class of ours (torch 2.11: a LogitTransform;
    torch 2.7: a NamedTuple too; 2.13 traces both): defaults stay None, numbers, strings and plain tuples
    of them, and an object-valued default comes from a factory. NamedTuples' defaults too."""
    import dataclasses
    import importlib
    import pkgutil

    import safedpo_kernels

    plain = (type(None), bool, int, float, str)

    def is_plain(value):
        return isinstance(value, plain) or (type(value) is tuple and all(is_plain(v) for v in value))

    checked = 0
    for info in pkgutil.walk_packages(safedpo_kernels.__path__, "safedpo_kernels."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            if dataclasses.is_dataclass(cls):
                defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            elif issubclass(cls, tuple) and hasattr(cls, "_field_defaults"):
                defaults = cls._field_defaults
            else:
                continue
            for name, value in defaults.items():
                assert is_plain(value), (cls.__qualname__, name, type(value))
                checked += 1
    assert checked >= 20
    call = safedpo_kernels.options.CallOptions()
    assert call.transform == safedpo_kernels.transform.LogitTransform() and call.groups == (None, None)
