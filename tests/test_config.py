import pytest

from itemgen.core.config import MODEL_NAMES, ConfigError, load_config
from itemgen.models.registry import BUILDERS


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: sasrec\ntrain:\n  lr: 0.01\n  batch_size: 16\nsasrec:\n  hidden: 32\n")
    cfg = load_config(p, ["train.lr=0.5", "itemlm.fields=title,brand", "itemlm.n_layers=3"])
    assert cfg.model == "sasrec"
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 16
    assert cfg.sasrec.hidden == 32
    assert cfg.itemlm.fields == ("title", "brand")
    assert cfg.itemlm.n_layers == 3
    assert cfg.data.max_history == 50  # default kept


def test_yaml_words_that_are_strings_here(tmp_path):
    # YAML 1.1 would read `no` as false and 1e-4 as a string; both are what the user meant here
    cfg = load_config(None, ["train.mixed_precision=no", "train.lr=1e-4", "train.progress=false"])
    assert cfg.train.mixed_precision == "no" and cfg.train.lr == 1e-4 and cfg.train.progress is False
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  mixed_precision: no\n  weight_decay: 1e-5\n")
    cfg = load_config(p)
    assert cfg.train.mixed_precision == "no" and cfg.train.weight_decay == 1e-5
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown config key in train: lrr"),
    (["train.batch_size=abc"], "train.batch_size: expected an integer"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["model=gpt"], "model: 'gpt' is not one of"),
    (["itemlm.supervise=some"], "itemlm.supervise"),
    (["nonsense"], "must look like section.key=value"),
    (["train=3"], "train: expected a mapping"),
])
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_the_config_model_names_are_the_registry():
    # config validates `model` against MODEL_NAMES without importing a model; the registry builds them
    assert tuple(BUILDERS) == MODEL_NAMES
