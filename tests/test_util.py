import pytest
from omegaconf import OmegaConf

from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config


class Widget:
    def __init__(self, width, height=2):
        self.width, self.height = width, height


def test_instantiate_builds_target_with_params():
    w = instantiate_from_config({"target": "tests.test_util.Widget", "params": {"width": 3}})
    assert (w.width, w.height) == (3, 2)


def test_instantiate_accepts_omegaconf_and_extra_kwargs():
    cfg = OmegaConf.create({"target": "tests.test_util.Widget", "params": {"width": 1}})
    w = instantiate_from_config(cfg, height=7)
    assert (w.width, w.height) == (1, 7)


def test_typo_in_key_names_the_key_and_suggests():
    cfg = {"target": "tests.test_util.Widget", "params": {"width": 1, "heigth": 3}}
    with pytest.raises(ConfigError, match=r"model\.params\.heigth.*did you mean 'height'"):
        instantiate_from_config(cfg, where="model")


def test_unknown_target_names_it():
    with pytest.raises(ConfigError, match="tests.test_util.Widgte.*did you mean Widget"):
        get_obj_from_str("tests.test_util.Widgte")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg'"):
        get_obj_from_str("no_such_pkg.Thing")


def test_missing_target_key_is_an_error():
    with pytest.raises(ConfigError, match="has no 'target'"):
        instantiate_from_config({"params": {}}, where="data")
    with pytest.raises(ConfigError, match="unknown key"):
        instantiate_from_config({"target": "tests.test_util.Widget", "parms": {"width": 1}})
