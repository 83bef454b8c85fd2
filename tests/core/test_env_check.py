"""Unknown SECONDSTAGE_* variables are reported by name with the closest setting, or refused when strict."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from core.settings import (
    CommonSettings,
    UnknownSettingError,
    check_environment,
    known_env_names,
    unknown_env,
)


class _SideSettings(CommonSettings):
    """Stands for a deployable's settings class (serve's or align's) in these tests."""

    widget_count: int = 1


def test_known_names_are_every_settings_class_field_plus_the_extras() -> None:
    names = known_env_names()
    assert {"SECONDSTAGE_REDIS_URL", "SECONDSTAGE_VAR_DIR", "SECONDSTAGE_STRICT_ENV"} <= names
    assert "SECONDSTAGE_REDIS_PASSWORD" in names  # read by the deploy manifests only
    assert "SECONDSTAGE_WIDGET_COUNT" in names  # a loaded subclass counts, without being passed


def test_a_typo_is_reported_with_the_closest_name(caplog: pytest.LogCaptureFixture) -> None:
    env = {"SECONDSTAGE_WIDGET_COUNTS": "3", "SECONDSTAGE_REDIS_URL": "redis://x", "HOME": "/root"}
    with caplog.at_level(logging.WARNING, logger="secondstage.settings"):
        found = check_environment([_SideSettings], environ=env, strict=False)
    assert [(v.name, v.closest) for v in found] == [("SECONDSTAGE_WIDGET_COUNTS", "SECONDSTAGE_WIDGET_COUNT")]
    assert "SECONDSTAGE_WIDGET_COUNTS is not a secondstage setting" in caplog.text
    assert "did you mean SECONDSTAGE_WIDGET_COUNT?" in caplog.text


def test_known_and_foreign_variables_pass() -> None:
    env = {"secondstage_redis_url": "redis://x", "SECONDSTAGE_REDIS_PASSWORD": "p", "OTHER_SECONDSTAGE_X": "1"}
    assert unknown_env(environ=env) == []


def test_a_name_like_nothing_has_no_suggestion() -> None:
    [found] = unknown_env(environ={"SECONDSTAGE_ZZZZZZZZZZZZZZZZ": "1"})
    assert found.closest is None and "no setting has a similar name" in found.describe()


def test_strict_refuses_naming_the_variable_and_the_fix() -> None:
    env = {"SECONDSTAGE_REDIS_ULR": "redis://x"}
    with pytest.raises(UnknownSettingError, match=r"SECONDSTAGE_REDIS_ULR.*did you mean SECONDSTAGE_REDIS_URL"):
        check_environment(environ=env, strict=True)
    with pytest.raises(UnknownSettingError):  # strict from the environment itself
        check_environment(environ={**env, "SECONDSTAGE_STRICT_ENV": "true"})
    assert len(check_environment(environ=env)) == 1  # default: a warning, not an error


def test_the_root_cli_checks_before_any_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.cli import app

    monkeypatch.setenv("SECONDSTAGE_MAX_MODEL_LENGTH", "4096")
    runner = CliRunner()
    refused = runner.invoke(app, ["--strict-env", "versions", "--help"])
    assert refused.exit_code == 2
    assert "SECONDSTAGE_MAX_MODEL_LEN" in refused.output  # serve's setting is known to the root CLI
    assert runner.invoke(app, ["versions", "--help"]).exit_code == 0  # warned only
    monkeypatch.delenv("SECONDSTAGE_MAX_MODEL_LENGTH")
    monkeypatch.setenv("SECONDSTAGE_LORA_RANK", "8")  # align's setting: known too, whichever command runs
    assert runner.invoke(app, ["--strict-env", "versions", "--help"]).exit_code == 0
