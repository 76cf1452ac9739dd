from pathlib import Path

import pytest

from unetdist.config import ConfigError, load_config, config_from_dict, to_dict
from tests.conftest import PYTHON, REPO, run_cmd


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/default.yaml", ["train.steps=7", "train.lr=1e-4", "model.bilinear=true"])
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.bilinear is True
    assert cfg.model.base_width == 16  # from the file, not the dataclass default


def test_every_shipped_config_loads() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert config_from_dict(to_dict(cfg)) == cfg, path


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'.*did you mean 'train.steps'"):
        load_config(None, ["train.step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_and_choice() -> None:
    with pytest.raises(ConfigError, match=r"'train.steps' must be int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'model.norm' must be one of \['batch', 'group', 'instance'\]"):
        load_config(None, ["model.norm=layer"])
    with pytest.raises(ConfigError, match=r"data.shard.overlap"):
        load_config(None, ["data.shard.overlap=500"])


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exits_nonzero_with_message(tmp_path: Path) -> None:
    proc = run_cmd([PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"), "train.stepz=1"])
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "train", "--config", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2
    assert "missing.yaml" in proc.stderr


def _keys(cls: type, prefix: str = "") -> list[str]:
    import dataclasses

    out = []
    for f in dataclasses.fields(cls):
        hint = cls.__dataclass_fields__[f.name].default_factory if f.default_factory is not dataclasses.MISSING else None
        if hint is not None and dataclasses.is_dataclass(hint):
            out += _keys(hint, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_readme_documents_every_config_key() -> None:
    import re

    from unetdist.config import Config

    cells = [line.split("|")[1] for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `")]
    for key in _keys(Config):
        parent, leaf = key.rsplit(".", 1)
        documented = any(
            cell.strip().startswith(f"`{parent}.") and leaf in re.findall(r"\w+", cell.replace(parent, ""))
            for cell in cells
        )
        assert documented, f"README's config reference lacks {key}"
