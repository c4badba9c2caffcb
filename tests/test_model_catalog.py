"""The model catalog: complete against the SDK's `Model` list, and loud about bad data."""

from __future__ import annotations

import datetime as dt
import typing
from pathlib import Path

import pytest
from anthropic._data.deprecated_models import DEPRECATED_MODELS
from anthropic.types.model import Model

from batchd.daemon.models.catalog import CatalogError, default_catalog, load_catalog


def _sdk_model_ids() -> list[str]:
    args = typing.get_args(Model)
    literal = next(arg for arg in args if typing.get_origin(arg) is typing.Literal)
    return list(typing.get_args(literal))


def test_every_sdk_model_id_is_in_the_catalog() -> None:
    """A model the installed SDK names must resolve, or the emulator would call it unknown."""
    catalog = default_catalog()
    missing = [m for m in _sdk_model_ids() if catalog.get(m) is None]
    assert missing == []


def test_sdk_deprecations_have_a_retirement_date() -> None:
    """The SDK's deprecation list is the final word on when a model stops answering."""
    catalog = default_catalog()
    for model_id in DEPRECATED_MODELS:
        info = catalog.get(model_id)
        assert info is not None and info.retires is not None, model_id


def test_sonnet_4_5_is_retired_today_and_haiku_5_5_is_not() -> None:
    catalog = default_catalog()
    today = dt.date(2026, 12, 1)
    sonnet = catalog.get("claude-sonnet-4-5")
    haiku = catalog.get("claude-haiku-5-5")
    assert sonnet is not None and sonnet.retired_on(today)
    assert haiku is not None and not haiku.retired_on(today)
    assert catalog.lookup("claude-3-opus-latest").retired == dt.date(2026, 1, 5)
    assert not catalog.lookup("claude-nonexistent-9").known


def test_alias_resolves_to_the_dated_model() -> None:
    info = default_catalog().get("claude-haiku-4-5")
    assert info is not None and info.id == "claude-haiku-4-5-20251001"
    assert "claude-haiku-4-5" in info.aliases


def test_haiku_5_5_long_prompt_tier() -> None:
    info = default_catalog().get("claude-haiku-5-5")
    assert info is not None
    short, long = info.prices_for(100_000), info.prices_for(100_001)
    assert short is not None and long is not None
    assert (short.input, long.input) == (0.10, 0.50)


def test_like_inherits_and_overrides() -> None:
    catalog = default_catalog()
    fable, mythos = catalog.get("claude-fable-5-2"), catalog.get("claude-mythos-5-2")
    assert fable is not None and mythos is not None
    assert mythos.price == fable.price
    assert fable.max_output_beta is None  # Fable/Mythos have no 300K batch beta


def test_extra_file_adds_a_model_like_a_bundled_one(tmp_path: Path) -> None:
    extra = tmp_path / "models.toml"
    extra.write_text(
        '[models."claude-haiku-6"]\nlike = "claude-haiku-5-5"\nmax_output = 200000\n'
        '[aliases]\n"claude-haiku-latest" = "claude-haiku-6"\n'
    )
    catalog = load_catalog(extra)
    info = catalog.get("claude-haiku-latest")
    assert info is not None and info.id == "claude-haiku-6" and info.max_output == 200000
    assert info.thinking_default == "adaptive"
    assert catalog.get("claude-opus-5-5") is not None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[models."m"]\nlike = "nope"\n', "like = 'nope'"),
        ('[models."m"]\nlike = "claude-haiku-5-5"\nmax_outptu = 5\n', "max_outptu"),
        ('[models."m"]\nlike = "claude-haiku-5-5"\nefforts = ["huge"]\n', "efforts"),
        ('[models."m"]\nlike = "claude-haiku-5-5"\nretires = "soon"\n', "retires"),
        ('[models."m"]\nlike = "claude-haiku-5-5"\nprice = { input = 1 }\n', "price.output"),
        ("[modles]\n", "modles"),
        ("not toml = = =\n", "not valid"),
    ],
)
def test_bad_extra_file_names_the_field(tmp_path: Path, text: str, named: str) -> None:
    extra = tmp_path / "models.toml"
    extra.write_text(text)
    with pytest.raises(CatalogError) as caught:
        load_catalog(extra)
    assert str(extra) in str(caught.value) and named in str(caught.value)


def test_extra_file_corrects_a_bundled_model(tmp_path: Path) -> None:
    """A table for a bundled id names only what it corrects (no `like` to itself)."""
    extra = tmp_path / "models.toml"
    extra.write_text('[models."claude-sonnet-5-5"]\nthinking_types = ["adaptive", "disabled"]\n'
                     '[models."claude-haiku-4-5"]\nmax_output = 32000\n')
    catalog = load_catalog(extra)
    sonnet = catalog.get("claude-sonnet-5-5")
    assert sonnet is not None and "disabled" in sonnet.thinking_types
    assert sonnet.max_output == 128000 and sonnet.price is not None  # the rest is kept
    haiku = catalog.get("claude-haiku-4-5")  # an alias names the model it stands for
    assert haiku is not None and haiku.id == "claude-haiku-4-5-20251001"
    assert haiku.max_output == 32000 and haiku.efforts == ()


def test_config_models_correct_a_bundled_model(tmp_path: Path) -> None:
    """[models."<bundled id>"] in a config corrects that model the same way."""
    from batchd.daemon.models.catalog import with_models

    catalog = with_models({"claude-haiku-5-5": {"max_output": 50}}, "pipeline.toml: [models]")
    info = catalog.get("claude-haiku-5-5")
    assert info is not None and info.max_output == 50 and info.thinking_default == "adaptive"
