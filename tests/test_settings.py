"""Environment settings: .env parsing, precedence, masking, export and caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from drrik.errors import ConfigError
from drrik.settings import EnvironmentSettings, get_settings, read_env_file

ENV_TEXT = """\
# a comment, then a blank line

export WANDB_API_KEY="wandb-from-file"
HF_TOKEN = 'hf_from_file'   # trailing comment
WANDB_MODE=offline # inline comment
WANDB_ENTITY="team # not a comment"
OTHER=a=b==
"""


def write_env(tmp_path: Path, text: str = ENV_TEXT) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_env_file_parsing(tmp_path: Path) -> None:
    assert read_env_file(write_env(tmp_path)) == {
        "WANDB_API_KEY": "wandb-from-file",
        "HF_TOKEN": "hf_from_file",
        "WANDB_MODE": "offline",
        "WANDB_ENTITY": "team # not a comment",
        "OTHER": "a=b==",
    }
    assert read_env_file(tmp_path / "missing.env") == {}


def test_malformed_line_is_named_by_number_without_its_text(tmp_path: Path) -> None:
    path = write_env(tmp_path, "WANDB_MODE=offline\nhf_pastedsecret123\n")
    with pytest.raises(ConfigError, match="line 2 is not KEY=VALUE") as info:
        read_env_file(path)
    assert "pastedsecret" not in str(info.value)


def test_environment_wins_over_env_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WANDB_API_KEY", "wandb-from-env")
    clean_env.setenv("HUGGING_FACE_HUB_TOKEN", "hf_from_env_alias")
    settings = EnvironmentSettings.load(write_env(tmp_path))
    assert settings.wandb_api_key == "wandb-from-env"
    assert settings.hf_token == "hf_from_env_alias"
    assert settings.wandb_mode == "offline"
    assert settings.wandb_project is None
    assert settings.from_env_file == {"wandb_mode", "wandb_entity"}
    assert EnvironmentSettings.load(None, environ={}) == EnvironmentSettings()


def test_repr_and_str_mask_secrets(tmp_path: Path) -> None:
    settings = EnvironmentSettings.load(write_env(tmp_path), environ={})
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "wandb-from-file" not in text and "hf_from_file" not in text
        assert "wandb_api_key='****'" in text and "wandb_mode='offline'" in text
    assert "hf_token=None" in repr(EnvironmentSettings())


def test_export_secrets_only_from_env_file_and_never_overwrites(tmp_path: Path) -> None:
    environ = {"HF_TOKEN": "hf_already_set"}
    settings = EnvironmentSettings.load(write_env(tmp_path), environ=environ)
    assert settings.hf_token == "hf_already_set"
    assert settings.export_secrets(environ) == ["WANDB_API_KEY"]
    assert environ == {"HF_TOKEN": "hf_already_set", "WANDB_API_KEY": "wandb-from-file"}
    assert settings.export_secrets(environ) == []


def test_get_settings_is_cached_until_reload(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, "WANDB_PROJECT=first\n")
    first = get_settings(env_file)
    assert first.wandb_project == "first"
    env_file.write_text("WANDB_PROJECT=second\n")
    assert get_settings(env_file) is first
    assert get_settings(env_file, reload=True).wandb_project == "second"
    other = tmp_path / "other.env"
    other.write_text("WANDB_PROJECT=third\n")
    assert get_settings(other).wandb_project == "third"
