"""Config loaders refuse unknown keys at every level, naming the key and the allowed ones,
and `--quick`/`--full` never replace what the user's file configured."""

import pytest

from fedquant.simulations import compare
from fedquant.simulations.common import check_keys


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("[dme]\nclinets = 3\n", "dme.clinets"),
    ("[fl]\nrouns = 3\n", "fl.rouns"),
    ("[speed]\nrepeat = 3\n", "speed.repeat"),
    ("[quick.dme]\ninptus = ['normal']\n", "quick.dme.inptus"),
    ("[full]\nstudys = []\n", "full.studys"),
    ("nmae = 'x'\n", "nmae"),
])
def test_compare_rejects_a_typo_at_any_level(tmp_path, text, key):
    with pytest.raises(compare.ConfigError, match=f"'{key}'.*allowed"):
        compare.load_config(_write(tmp_path, text))


def test_quick_keeps_the_users_codec_list(tmp_path):
    path = _write(tmp_path, '[dme]\ncodecs = [{ codec = "eden", bits = 3 }]\n'
                            '[fl]\ncodecs = [{ codec = "drive" }]\n')
    for mode in ("default", "quick", "full"):
        cfg = compare.load_config(path, mode)
        assert cfg["dme"]["codecs"] == [{"codec": "eden", "bits": 3}], mode
        assert cfg["fl"]["codecs"] == [{"codec": "drive"}], mode
    quick = compare.load_config(path, "quick")
    assert quick["dme"]["d"] == compare.load_config(None, "quick")["dme"]["d"]  # still small
    own = _write(tmp_path, '[dme]\nd = 1024\n[quick.dme]\nd = 512\n')
    assert compare.load_config(own, "quick")["dme"]["d"] == 512  # the file's own [quick]
    assert compare.load_config(own)["dme"]["d"] == 1024


def test_check_keys_checks_tables_inside_lists():
    schema = {"codecs": [{"name": str, "bits": int}]}
    check_keys({"codecs": [{"name": "eden", "bits": 2}]}, schema)
    with pytest.raises(ValueError, match=r"codecs\[1\]\.bts"):
        check_keys({"codecs": [{"name": "eden"}, {"bts": 2}]}, schema)
    with pytest.raises(ValueError, match="list of tables"):
        check_keys({"codecs": ["eden"]}, schema)
