"""The training command's options: defaults, and clear errors for bad values."""

import pytest

from training.config import TrainConfig, parse_args, validation_size


def test_defaults_follow_the_issue():
    c = parse_args([])
    assert c.label_smoothing == 0.1 and c.data == "keras" and c.n_validation is None
    assert validation_size(c.n_validation, 50_000) == 5000   # CIFAR-10: the 45,000/5,000 split
    assert isinstance(c, TrainConfig)


def test_flags_parse():
    c = parse_args(["--optimizer", "adamw", "--weight-decay", "0.01", "--mix", "cutmix",
                    "--no-flip-tta", "--mixed-precision", "--width", "8", "--epochs", "3"])
    assert (c.optimizer, c.weight_decay, c.mix, c.flip_tta, c.mixed_precision, c.width, c.epochs) == \
        ("adamw", 0.01, "cutmix", False, True, 8, 3)


def test_airbench_recipe_flags_parse():
    c = parse_args(["--arch", "airbench", "--activation", "gelu", "--bias-lr-scale", "64",
                    "--lookahead", "--lr-start-factor", "0.2", "--lr-end-factor", "0.07",
                    "--translate-tta", "--bn-momentum", "0.6", "--logit-scale", "0.111",
                    "--whiten-eps", "0.05"])
    assert (c.arch, c.activation, c.bias_lr_scale, c.lookahead, c.translate_tta) == \
        ("airbench", "gelu", 64.0, True, True)
    assert (c.lr_start_factor, c.lr_end_factor, c.bn_momentum, c.logit_scale) == (0.2, 0.07, 0.6, 0.111)
    assert c.whiten_eps == 0.05
    c = parse_args(["--group-widths", "32,128,128", "--alternate-flip", "--validate-every", "4"])
    assert (c.group_widths_tuple(), c.alternate_flip, c.validate_every) == ((32, 128, 128), True, 4)
    assert parse_args(["--validate-every", "0"]).validate_every == 0
    assert parse_args([]).group_widths_tuple() == ()
    c = parse_args(["--optimizer", "muon", "--muon-lr", "0.2", "--muon-momentum", "0.5"])
    assert (c.optimizer, c.muon_lr, c.muon_momentum) == ("muon", 0.2, 0.5)
    assert (parse_args([]).arch, parse_args([]).lookahead) == ("resnet9", False)
    frozen = parse_args(["--arch", "airbench", "--whiten-bias-epochs", "3"])
    assert (frozen.whiten_bias_epochs, parse_args([]).whiten_bias_epochs) == (3, 0)
    freeze_out = parse_args(["--arch", "airbench", "--epochs", "13", "--freeze-group1-epochs", "5"])
    assert (freeze_out.freeze_group1_epochs, parse_args([]).freeze_group1_epochs) == (5, 0)
    fast = parse_args(["--activation", "quick_gelu", "--batchnorm", "fused"])
    assert (fast.activation, fast.batchnorm, parse_args([]).batchnorm) == ("quick_gelu", "fused", "keras")
    low = parse_args(["--epochs", "14", "--low-res-epochs", "6", "--low-res-size", "20"])
    assert (low.low_res_epochs, low.low_res_size, parse_args([]).low_res_epochs) == (6, 20, 0)


@pytest.mark.parametrize("argv", [["--optimizer", "rmsprop"], ["--mix", "blend"],
                                  ["--arch", "vgg"], ["--activation", "tanh"],
                                  ["--label-smoothing", "1.5"], ["--epochs", "0"],
                                  ["--group-widths", "32,128"], ["--group-widths", "32,x,128"],
                                  ["--group-widths", "0,8,8"], ["--validate-every", "-1"],
                                  ["--whiten-bias-epochs", "-1"], ["--whiten-bias-epochs", "3"],
                                  ["--batchnorm", "group"], ["--epochs", "4", "--low-res-epochs", "4"],
                                  ["--low-res-epochs", "-1"], ["--low-res-epochs", "2", "--low-res-size", "8"],
                                  ["--low-res-epochs", "2", "--low-res-size", "32"],
                                  ["--arch", "airbench", "--freeze-group1-epochs", "-1"],
                                  ["--arch", "airbench", "--epochs", "4", "--freeze-group1-epochs", "4"],
                                  ["--freeze-group1-epochs", "2"]])
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
