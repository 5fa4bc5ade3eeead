"""The trainer's configuration: unknown keys, values converted and range-checked by key, YAML spellings,
a missing model named in one line."""

import pytest

pytest.importorskip("transformers")

from safedpo.config import load_config  # noqa: E402


def test_config_unknown_keys_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("beta: 0.2\nmode: noswap\n")
    cfg = load_config(str(cfg_file), ["delta=5", "loss_input=linear", "train_files=a.jsonl"])
    assert (cfg.loss.beta, cfg.data.mode, cfg.loss.delta, cfg.loss.loss_input, cfg.data.train_files) == (
        0.2, "noswap", 5.0, "linear", ["a.jsonl"])
    cfg_file.write_text("beta: 0.2\nbetta: 1\n")
    with pytest.raises(ValueError, match="unknown config key\\(s\\): betta"):
        load_config(str(cfg_file))
    with pytest.raises(ValueError, match="unknown config key: lrr"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="mode must be one of"):
        load_config(None, ["mode=dpo", "tiny_model={hidden_size: 8}", "train_files=x"]).validate()


@pytest.mark.parametrize(
    "values, words",
    [
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(grad_accum=0), "grad_accum must be at least 1"),
        (dict(max_length=0), "max_length must be at least 1"),
        (dict(max_prompt_length=-3), "max_prompt_length must be at least 1"),
        (dict(save_every=-1), "save_every must be >= 0"),
        (dict(eval_every=-2), "eval_every must be >= 0"),
        (dict(device="tpu"), "device must be one of"),
        (dict(progress="no"), "progress expects true or false"),
        (dict(lr="fast"), "lr expects a number"),
        (dict(batch_size=2.5), "batch_size expects an integer"),
        (dict(train_files=[1, 2]), "train_files expects a list of strings"),
        (dict(beta=float("inf")), "beta expects a finite number"),
    ],
)
def test_config_values_are_checked_by_key(values, words):
    base = dict(tiny_model={"hidden_size": 8}, train_files=["x.jsonl"])
    with pytest.raises(ValueError, match=words):
        load_config(None, **{**base, **values}).validate()


def test_config_accepts_numbers_in_any_yaml_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-6\nbeta: 1\nmax_steps: '10'\ntrain_files: a.jsonl\ntiny_model: {hidden_size: 8}\n")
    cfg = load_config(str(path)).validate()
    assert (cfg.optim.lr, cfg.loss.beta, cfg.optim.max_steps, cfg.data.train_files) == (5e-6, 1.0, 10, ["a.jsonl"])


def test_a_missing_model_is_one_clear_line(tmp_path):
    from safedpo.model import load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"tokenizer '.*/nope': no such local directory$"):
        load_tokenizer(str(tmp_path / "nope"))




def test_the_config_builds_the_loss_options_it_trains():
    base = dict(tiny_model={"hidden_size": 8}, train_files=["x"], beta=0.2, delta=3.0, label_smoothing=0.1,
                loss_type="robust", reduction="sum", average_logps=True)
    flags = dict(safedpo=(3.0, True, True), noswap=(3.0, False, True))
    flags.update({m: (0.0, False, False) for m in ("dpo-helpful", "dpo-harmless", "dpo-safebetter")})
    for mode, (delta, swap, drop) in flags.items():
        o = load_config(None, mode=mode, **base).validate().loss_options()
        assert (o.beta, o.delta, o.swap, o.drop_both_unsafe, o.label_smoothing, o.loss_type, o.reduction, o.average) == (
            0.2, delta, swap, drop, 0.1, "robust", "sum", True)
    for key, value in (("loss_type", "dpo"), ("reduction", "none"), ("beta", 0.0), ("label_smoothing", 0.7)):
        with pytest.raises(ValueError, match=key):
            load_config(None, **{**base, key: value}).validate()


def test_a_later_layer_picks_between_files_and_a_dataset(tmp_path):
    """A recipe's train_dataset gives way to train_files=... on the command line (and the other way round);
    both in one layer stay an error."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\ntrain_dataset: PKU-Alignment/PKU-SafeRLHF\n")
    cfg = load_config(str(recipe), ["train_files=mine.jsonl"]).validate()
    assert cfg.data.train_files == ["mine.jsonl"] and cfg.data.train_dataset == ""
    recipe.write_text("model: m\ntrain_files: [a.jsonl]\n")
    cfg = load_config(str(recipe), ["train_dataset=some/set"]).validate()
    assert cfg.data.train_files == [] and cfg.data.train_dataset == "some/set"
    with pytest.raises(ValueError, match="not both"):
        load_config(str(recipe), ["train_dataset=some/set", "train_files=b.jsonl"]).validate()


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nmode: [safedpo\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML \(.*line 3, column 1\)"):
        load_config(str(bad))
    with pytest.raises(ValueError, match=r"override 'columns=\{a: \[': its value is not valid YAML"):
        load_config(None, ["columns={a: ["])


def test_train_help_lists_every_key_with_its_default_under_its_section():
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safedpo.config import KEYS, TrainConfig

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "safedpo", "train", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=root)
    assert res.returncode == 0
    out = res.stdout
    defaults = TrainConfig().flat()
    for name, (section, attr) in KEYS.items():
        help = dataclasses_help(section, attr)
        assert f"\n  {name} = {json.dumps(defaults[name])}\n      {help}" in out, name
        assert out.index(f"\n  # {section}: ") < out.index(f"\n  {name} = "), name
    assert '\n  beta = 0.1\n      the implicit reward' in out and '\n  model = ""\n      a local Hugging Face' in out


def dataclasses_help(section: str, attr: str) -> str:
    import dataclasses

    from safedpo.config import TrainConfig

    cls = type(getattr(TrainConfig(), section))
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == attr)


def test_sections_hold_every_key_once_and_the_flat_form_round_trips(tmp_path):
    """Every flat key lives in one section; a saved config.yaml (flat) loads back equal; the sections are
    what the builders take."""
    from safedpo.config import KEYS, SECTIONS, TrainConfig

    assert SECTIONS == ("data", "model", "loss", "optim", "run", "parallel", "eval")
    assert len(KEYS) == len(set(KEYS)) == len({v for v in KEYS.values()})
    cfg = load_config(None, ["model=some/dir", "beta=0.3", "lr=1e-5", "fsdp=true", "judge_threshold=0.7", "mode=noswap",
                             "train_files=a.jsonl", "save_every=4"])
    assert (cfg.model.path, cfg.loss.beta, cfg.optim.lr, cfg.parallel.fsdp, cfg.eval.judge_threshold, cfg.data.mode,
            cfg.run.save_every) == ("some/dir", 0.3, 1e-5, True, 0.7, "noswap", 4)
    flat = cfg.flat()
    assert list(flat) == list(KEYS) and flat["model"] == "some/dir" and "path" not in flat
    cfg.save(tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg and again.flat() == flat
    assert TrainConfig().flat() == load_config(None).flat()
