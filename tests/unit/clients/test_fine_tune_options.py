"""The SDK's fine-tune strategies as FreezeOptions messages."""

import pytest

from fitserve._specs import freeze_options

NO_SECOND_PHASE = {"unfreeze_top_k": 0, "unfreeze_learning_rate": 0.0, "unfreeze_epochs": 0}


def test_freeze_layers_split_into_names_and_indices():
    options = freeze_options(
        train_last_n_layers=None, new_head=None, freeze_layers=["dense", -2, 0], **NO_SECOND_PHASE
    )
    assert options.WhichOneof("strategy") == "freeze_layers"
    assert list(options.freeze_layers.names) == ["dense"]
    assert list(options.freeze_layers.indices) == [-2, 0]


def test_head_layers_carry_drop_last_and_train_base():
    head = [{"type": "Dense", "units": 4}]
    options = freeze_options(
        train_last_n_layers=None,
        new_head=None,
        head_layers=head,
        drop_last=1,
        train_base=True,
        **NO_SECOND_PHASE,
    )
    assert options.WhichOneof("strategy") == "head_layers"
    assert options.head_layers.layers[0]["units"] == 4
    assert (options.head_layers.drop_last, options.head_layers.train_base) == (1, True)


def test_two_strategies_or_stray_head_options_are_refused():
    with pytest.raises(ValueError, match="not several"):
        freeze_options(train_last_n_layers=1, new_head=None, freeze_layers=[0], **NO_SECOND_PHASE)
    with pytest.raises(ValueError, match="go with head_layers"):
        freeze_options(train_last_n_layers=1, new_head=None, drop_last=1, **NO_SECOND_PHASE)
