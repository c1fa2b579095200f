"""One codec-spec syntax, "name:key=value,...", parsed by one public function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant.server.rounds import RoundConfig


def test_spec_and_keywords_give_the_same_codec():
    a = fq.get_codec("eden:bits=3,scale=biased,rotations=2")
    b = fq.get_codec("eden", bits=3, scale="biased", rotations="2")
    assert a.params() == b.params() and type(a) is type(b)
    assert fq.get_codec("eden:bits=3", bits=4).params()["bits"] == 4  # keywords override


@pytest.mark.parametrize("name", fq.available_codecs())
def test_codec_spec_round_trips_every_codec(name):
    codec = fq.get_codec(name)
    again = fq.get_codec(fq.codec_spec(codec))
    assert again.params() == codec.params()
    x = torch.randn(300)
    if name in ("lplr", "lplr-svd", "dsvd"):
        x = torch.randn(20, 15)
    assert again.encode(x, seed=5).to_bytes() == codec.encode(x, seed=5).to_bytes()


@pytest.mark.parametrize("spec,message", [
    ("", "non-empty"), (":bits=2", "no codec name"), ("eden:bits", "bad item"),
    ("eden:bits=2,bits=3", "twice"), ("eden:bits=", "bad item"), ("nope", "unknown codec"),
    ("eden:colour=red", "unknown parameter"), ("eden:bits=two", "not a valid int"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        fq.get_codec(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_the_parser_either_parses_or_raises_a_value_error(text):
    try:
        name, params = fq.parse_codec_spec(text)
    except ValueError:
        return
    assert name and ":" not in name
    assert all(k and v and "=" not in k and "," not in v for k, v in params.items())
    try:
        fq.get_codec(text)
    except ValueError:
        pass  # an unknown codec or parameter: a clear error, never another exception


def test_the_servers_rounds_file_takes_a_spec():
    spec = {"id": "r", "codec": "eden:bits=3", "shape": [100], "expected": 2}
    a = RoundConfig.from_dict(spec)
    b = RoundConfig.from_dict({**spec, "codec": "eden", "params": {"bits": 3}})
    assert (a.codec, a.params) == (b.codec, b.params) and a.params["bits"] == "3"
    with pytest.raises(ValueError, match="both"):
        RoundConfig.from_dict({**spec, "params": {"bits": 2}})


def test_experiment_configs_take_a_spec_or_a_table_alike():
    from fedquant.simulations import compare, dme

    for spec in ("eden:bits=3", {"codec": "eden:bits=3"}, {"codec": "eden", "bits": 3}):
        assert compare.codec_spec(spec, "x") == ("eden", {"bits": 3})
    assert dme.expand_codecs(["eden:bits=3"], [1]) == dme.expand_codecs(
        [{"codec": "eden", "bits": 3}], [1])
    with pytest.raises(ValueError, match="both"):
        compare.codec_spec({"codec": "eden:bits=3", "bits": 2}, "x")


def test_compare_takes_a_task_module_for_its_fl_section(tmp_path):
    from fedquant.simulations import compare

    path = tmp_path / "my.toml"
    path.write_text('[[fl.scenarios]]\nname = "mine"\ntask = "synthetic"\n')
    for mode in ("default", "quick"):  # the user's scenarios replace the default ones
        cfg = compare.load_config(path, mode)
        assert [(s["name"], s["task"]) for s in compare.scenario_configs(cfg)] == [
            ("mine", "synthetic")]
