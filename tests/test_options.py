"""DecodingOptions is the one definition: the CLI flags, the service's parameters, settings and response follow it."""

import dataclasses

import pytest
from pydantic import ValidationError

from captioner.cli import build_parser
from captioner.decoding import RECOMMENDED, DecodingOptions
from captioner.options import decoding_fields, decoding_options
from captioner.usage import UsageError
from service.schemas import CaptionParams, DecodingOut
from service.settings import Settings

NAMES = [f.name for f in dataclasses.fields(DecodingOptions)]


def test_every_option_is_a_flag_a_parameter_a_setting_and_a_response_field():
    args = build_parser().parse_args(["caption", "x.jpg"])
    assert {n for n in NAMES if hasattr(args, n)} == set(NAMES)
    assert [n for n in CaptionParams.model_fields if n != "attention"] == NAMES
    assert list(DecodingOut.model_fields) == NAMES
    assert [n for n in NAMES if n in Settings.model_fields] == [n for n in NAMES if n != "seed"]
    # One description everywhere.
    for spec in decoding_fields():
        assert CaptionParams.model_fields[spec.name].description == spec.about.description
        assert DecodingOut.model_fields[spec.name].description == spec.about.description


def test_recommended_defaults_reach_the_cli_the_settings_and_the_api():
    cli = decoding_options(build_parser().parse_args(["caption", "x.jpg"]))
    server = Settings().default_decoding()
    for key, value in RECOMMENDED.items():
        assert getattr(cli, key) == value and getattr(server, key) == value, key
    assert cli == server


def test_bounds_hold_everywhere_and_the_service_adds_its_limits():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        DecodingOptions(top_p=0)
    with pytest.raises(ValidationError):
        CaptionParams(top_p=0)
    with pytest.raises(ValidationError):
        Settings(top_p=0)
    with pytest.raises(UsageError, match="max_length must be >= 1"):
        decoding_options(build_parser().parse_args(["caption", "x.jpg", "--max-length", "0"]))
    # A request may not ask for 11 beams (work per request), the library and the CLI may.
    assert DecodingOptions(method="beam", beam_size=11).beam_size == 11
    assert decoding_options(build_parser().parse_args(["caption", "x.jpg", "--beam-size", "11"])).beam_size == 11
    with pytest.raises(ValidationError):
        CaptionParams(beam_size=11)
    with pytest.raises(ValidationError):
        Settings(beam_size=11)
