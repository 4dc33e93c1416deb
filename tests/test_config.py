import pytest
from transformers import HfArgumentParser

from hf_freeze import FreezeConfig


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"policy": "magic"}, "`policy` must be one of"),
        ({"schedule": "cosine"}, "`schedule` must be one of"),
        ({"interval": 0}, "`interval` is a fraction"),
        ({"interval": 1.5}, "`interval` is a fraction"),
        ({"interval_steps": 0}, "`interval_steps` must be at least 1"),
        ({"percentile": 101}, "`percentile` must be between 0 and 100"),
        ({"freeze_start": 1.0}, "`freeze_start`"),
        ({"schedule_fraction": 0}, "`schedule_fraction`"),
        ({"freeze_level": 2}, "`freeze_level`"),
        ({"policy": "fixed"}, "needs `boundary`"),
        ({"max_boundary": -1}, "cannot be negative"),
        ({"cache": "sometimes"}, "`cache` must be one of"),
        ({"cache_dtype": "int8"}, "`cache_dtype` must be one of"),
        ({"cache_max_bytes": 0}, "`cache_max_bytes` must be positive"),
        ({"cache_max_bytes": -5}, "`cache_max_bytes` must be positive"),
        ({"tied_weights": "share"}, "`tied_weights` must be one of"),
        ({"on_stale_cache": "ignore"}, "`on_stale_cache` must be one of"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(values, message):
    with pytest.raises(ValueError, match=message):
        FreezeConfig(**values)


def test_round_trip_through_dict():
    config = FreezeConfig(policy="schedule", schedule="linear", freeze_start=0.3, max_boundary=5)
    assert FreezeConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="Unknown FreezeConfig fields \\['polcy'\\]"):
        FreezeConfig.from_dict({"polcy": "fixed"})


def test_every_field_is_a_command_line_flag():
    (config,) = HfArgumentParser(FreezeConfig).parse_args_into_dataclasses(
        ["--policy", "fixed", "--boundary", "3", "--cache", "off", "--cache_dir", "/tmp/x", "--percentile", "30"]
    )
    assert config == FreezeConfig(policy="fixed", boundary=3, cache="off", cache_dir="/tmp/x", percentile=30)


def test_unknown_policy_on_the_command_line_lists_choices(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(FreezeConfig).parse_args_into_dataclasses(["--policy", "magic"])
    assert "gradnorm" in capsys.readouterr().err
