"""pipeline.config: both shipped profiles load; every kind of bad params fails naming the dotted key.

Value checks run on the test profile (tests/params_test.yaml); the live params.yaml is only loaded.
"""
from __future__ import annotations

import copy
import re
import dataclasses
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pipeline import PROJECT_ROOT
from pipeline.config import ConfigError, Params, load_params, params_from_dict, replace
from tests.fakes import TEST_PARAMS_PATH

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "params.yaml"
FULL = ROOT / "params-full.yaml"


@pytest.fixture(scope="module")
def raw(test_params_path: Path) -> dict[str, Any]:
    return yaml.safe_load(test_params_path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every mapping key, descending into sections (not into list items)."""
    if not isinstance(node, dict):
        return set()
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.add(path)
        # free-form mappings (archive -> sha256, prompt type -> prob) may differ between profiles
        if isinstance(value, dict) and prefix == "":
            out |= _key_paths(value, path + ".")
    return out


# ---------------------------------------------------------------------------------------------- profiles
def test_live_params_file_loads() -> None:
    """params.yaml loads, whichever profile it holds (its values are the user's, not checked here)."""
    p = load_params(DEFAULT)
    assert isinstance(p, Params)
    assert params_from_dict(p.to_dict()) == p  # round trip through plain dicts


def test_test_profile_is_the_embedded_default(test_params: Params) -> None:
    """The tests' own profile: generated data and the tiny base model, so the suite runs offline on a CPU."""
    assert test_params.data.source == "embedded" and test_params.sam.variant == "tiny"
    assert params_from_dict(test_params.to_dict()) == test_params


def test_full_profile_loads_with_full_scale_values(test_params: Params) -> None:
    full, default = load_params(FULL), test_params  # the test profile is the embedded default
    assert full.data.source == "hqseg44k"
    assert full.sam.variant == "vit_l"
    assert full.prompts.eval_draws == 20
    assert full.train.device == "cuda" and full.embed.device == "cuda"
    assert full.embed.batch_size > default.embed.batch_size
    assert full.base_pretrain == default.base_pretrain  # unused at full scale, kept identical
    assert full.download == default.download


@pytest.mark.parametrize("other", [FULL, TEST_PARAMS_PATH], ids=["params-full", "params_test"])
def test_profiles_have_the_same_keys(other: Path) -> None:
    default = _key_paths(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
    keys = _key_paths(yaml.safe_load(other.read_text(encoding="utf-8")))
    assert not default - keys, f"add these keys to {other} too: {sorted(default - keys)}"
    assert not keys - default, f"{other} has keys params.yaml lacks: {sorted(keys - default)}"


# ---------------------------------------------------------------------------------------------- bad params
def _set(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw[section][key] = value
    return edit


def _delete(section: str, key: str | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        if key is None:
            del raw[section]
        else:
            del raw[section][key]
    return edit


BAD = [
    # unknown keys
    ("unknown key", _set("train", "learning_rate", 1e-3), "train.learning_rate"),
    ("unknown section", lambda raw: raw.update(bogus={"a": 1}), "bogus"),
    # wrong types
    ("str for float", _set("train", "lr", "fast"), "train.lr"),
    ("float for int", _set("train", "batch_size", 3.5), "train.batch_size"),
    ("bool for int", _set("train", "batch_size", True), "train.batch_size"),
    ("str for bool", _set("train", "bf16", "yes"), "train.bf16"),
    ("str for list", _set("data", "train_sets", "DIS5K-TR"), "data.train_sets"),
    ("list item type", _set("prompts", "train_point_counts", [1, "three"]), "prompts.train_point_counts[1]"),
    ("section not a mapping", lambda raw: raw.update(train=[1, 2]), "train"),
    # impossible values
    ("negative lr", _set("train", "lr", -1.0), "train.lr"),
    ("probability > 1", _set("views", "hflip_p", 1.5), "views.hflip_p"),
    ("unknown set", _set("data", "eval_sets", ["DIS5K-VD", "Nope"]), "data.eval_sets"),
    ("bad sha256", _set("download", "expected_sha256", {"DIS5K.zip": "xyz"}), "download.expected_sha256.DIS5K.zip"),
    ("bad endpoint", _set("download", "endpoint", "ftp://example.org/data"), "download.endpoint"),
    ("negative retries", _set("download", "retries", -1), "download.retries"),
    ("bad cron", _set("schedule", "cron", "* *"), "schedule.cron"),
    # bad Literals
    ("data source", _set("data", "source", "s3"), "data.source"),
    ("sam variant", _set("sam", "variant", "vit_x"), "sam.variant"),
    ("train device", _set("train", "device", "tpu"), "train.device"),
    # missing keys
    ("missing key", _delete("train", "lr"), "train.lr"),
    ("missing section", _delete("schedule"), "schedule"),
]


@pytest.mark.parametrize(("case", "edit", "key"), BAD, ids=[c[0] for c in BAD])
def test_bad_params_name_the_key_and_file(
    case: str, edit: Callable[[dict[str, Any]], None], key: str, raw: dict[str, Any], tmp_path: Path
) -> None:
    bad = copy.deepcopy(raw)
    edit(bad)
    path = _write(tmp_path, bad)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert key in msg, f"{case}: {msg}"
    assert str(path) in msg, f"{case}: the file is not named: {msg}"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    broken.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(broken)


# ---------------------------------------------------------------------------------------------- overrides
def test_overrides_like_dvc_exp_run_set(test_params_path: Path) -> None:
    base = load_params(test_params_path)
    p = load_params(test_params_path, overrides={"train.lr": 3e-4, "data.source": "hqseg44k", "sam.variant": "vit_l"})
    assert p.train.lr == 3e-4 and p.data.source == "hqseg44k" and p.sam.variant == "vit_l"
    assert p.train.batch_size == base.train.batch_size  # everything else untouched
    assert load_params(test_params_path, overrides={"train.lr": 1}).train.lr == 1.0  # an int is a valid float


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.lr": "x"}, "train.lr"),
        ({"train.no_such_key": 1}, "train.no_such_key"),
        ({"seed.sub": 1}, "seed.sub"),
        ({"data.source": "s3"}, "data.source"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict[str, Any], key: str, test_params_path: Path) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(test_params_path, overrides=overrides)


def test_params_are_frozen_and_replace_copies(test_params: Params) -> None:
    p = test_params
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.lr = 1.0  # type: ignore[misc]
    q = replace(p, **{"train.lr": 0.5, "download.retries": 7})
    assert q.train.lr == 0.5 and q.download.retries == 7
    assert p.train.lr != 0.5 and p.download.retries != 7
    with pytest.raises(ConfigError, match=r"train\.lr"):
        replace(p, **{"train.lr": -2.0})


def test_config_imports_neither_torch_nor_segment_anything(test_params_path: Path) -> None:
    """Loading params (download, the Prefect CLI, ...) must not pay for importing the model stack."""
    import subprocess
    import sys

    code = (f"import sys; import pipeline.config as c; c.load_params({str(test_params_path)!r}); "
            "print(sorted(m for m in ('torch', 'segment_anything', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("override,message", [
    ({"train.lr": float("nan")}, "train.lr: expected a finite number"),
    ({"train.epochs": float("inf")}, "train.epochs: expected a finite number"),
    ({"evaluate.benchmarks": ["COIFT", "coift"]}, "evaluate.benchmarks: unknown benchmark 'coift'"),
    ({"report.ours": "stable-sam"}, "report.ours: 'stable-sam' is not in evaluate.methods"),
    ({"report.baseline": "dt_sam"}, "report.baseline: 'dt_sam' is not in evaluate.methods"),
    ({"seeds.methods": ["dsp"]}, "seeds.methods: 'dsp' must also be in train.methods"),
    ({"train.methods": ["stable_sam"]}, "evaluate.methods: 'sam', 'pt_sam' not in train.methods"),
    ({"seeds.extra": [0, 1]}, "seeds.extra: 0 is the pipeline's own `seed`"),
])
def test_config_holes_are_closed(override: dict[str, Any], message: str, test_params_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(test_params_path, override)


def test_default_runs_one_seed_and_make_seeds_overrides_a_real_param():
    """The default profile trains one seed (the 10-minute run); `make seeds` sets `seeds.extra` through
    `dvc exp run -S`, and its value must pass the config's validation."""
    default = load_params(PROJECT_ROOT / "params.yaml")
    assert tuple(default.seeds.extra) == ()
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "dvc exp run -S 'seeds.extra=$(SEEDS)'" in makefile
    m = re.search(r"^SEEDS \?= (\S+)$", makefile, re.MULTILINE)
    assert m, "Makefile lost its SEEDS default"
    extra = yaml.safe_load(m.group(1))
    seeded = replace(default, **{"seeds.extra": extra})
    assert len(seeded.seeds.extra) >= 2 and default.seed not in seeded.seeds.extra  # >= 3 seeds in all
