"""One declaration per setting (flags, topics) and one label per step-message fault (issue 21)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from nec_cli.main import build_parser
from nec_serve.config_store import UnknownWorkflow
from nec_serve.errors import InvalidInput, ServerUnavailable
from nec_serve.messages import (
    DEAD_LETTER_TOPIC,
    STATUS_TOPIC,
    MessageError,
    RateKnob,
    parse_step_request,
)
from nec_serve.metrics import failure_class
from nec_serve.retry import GaveUp
from nec_serve.settings_flags import (
    DeferredParser,
    add_settings_flags,
    field_default,
    settings_values,
)
from nec_wrapper.main import settings_from_args
from nec_wrapper.step import WrapperSettings

ROOT = Path(__file__).resolve().parents[3]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (sub)command's parser, its deferred flags added."""
    if isinstance(parser, DeferredParser):
        parser.populate()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_flag_default_is_its_settings_default():
    """Generic over every command: a flag that fills a setting defaults to the setting's default."""
    covered = set()
    for path, parser in _commands(build_parser()):
        tagged = [a for a in parser._actions if hasattr(a, "settings_field")]
        classes = {a.settings_field[0] for a in tagged}
        covered |= classes
        for action in tagged:
            cls, name = action.settings_field
            default = action.default
            expected = field_default(cls, name)
            if default is None:  # left to the settings (e.g. a default computed at run time)
                continue
            got = tuple(default) if isinstance(default, list) else default
            assert got == expected, (path, action.option_strings)
        # A flag named like a setting but not built from it must still agree with it.
        fields = {name for cls in classes for name in _names(cls)}
        for action in parser._actions:
            if action.dest in fields and not hasattr(action, "settings_field"):
                cls = next(
                    c for c in classes if action.dest in {f.name for f in dataclasses.fields(c)}
                )
                if action.default is not None:
                    assert action.default == field_default(cls, action.dest), (path, action.dest)
    names = {cls.__name__ for cls in covered}
    assert names >= {
        "WrapperSettings",
        "InputLimits",
        "ControllerSettings",
        "MAEConfig",
        "NECConfig",
        "ClassifierConfig",
        "RVQConfig",
        "ExportOptions",
    }


def test_flags_are_built_from_a_settings_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        path: str
        count: int = 3
        rate: float | None = None
        names: tuple[str, ...] = ("a",)
        pair: tuple[float, float] = (0.5, 1.0)
        on: bool = False
        timeout_s: float = 2.0

    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Toy, rename={"timeout_s": "--timeout"})
    args = parser.parse_args(["--path", "p", "--names", "x", "y", "--pair", "1", "2", "--on"])
    assert Toy(**settings_values(args, Toy, {"timeout_s": "--timeout"})) == Toy(
        "p", 3, None, ("x", "y"), (1.0, 2.0), True, 2.0
    )
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --path has no default: required


def test_wrapper_group_and_session_timeout_go_through_the_settings(tmp_path):
    parser = build_parser()
    base = [
        "wrapper",
        "--mode=compress",
        "--model-dir=m",
        "--bootstrap=b",
        f"--config-dir={tmp_path}",
    ]
    settings = settings_from_args(parser.parse_args(base))
    assert settings.group == "nec-wrapper-compress"
    assert WrapperSettings("decompress", Path("m"), "b").group == "nec-wrapper-decompress"
    args = parser.parse_args([*base, "--group=g", "--session-timeout=12"])
    settings = settings_from_args(args)
    assert (settings.group, settings.session_timeout_s) == ("g", 12.0)


def test_topic_constants_match_k8s():
    config = yaml.safe_load((ROOT / "k8s/base/kafka-config.yaml").read_text())
    assert config["data"]["status.topic"] == STATUS_TOPIC
    assert config["data"]["deadletter.topic"] == DEAD_LETTER_TOPIC


def _step(**meta) -> dict:
    return {
        "previous_component_end": True,
        "S3_bucket_desc": {"folder": "in", "filename": "a.tif"},
        "meta_information": meta,
    }


def _two_codebooks(n: int) -> int:
    if not 1 <= n <= 2:
        raise InvalidInput(f"codebooks {n} out of range 1..2")
    return n


CODEBOOKS = [RateKnob("codebooks", _two_codebooks)]


@pytest.mark.parametrize(
    "msg",
    [
        b"not json",
        {"previous_component_end": True, "S3_bucket_desc": {"folder": "in"}},
        {**_step(), "previous_component_end": False},
        _step(codebooks="3"),
        _step(codebooks=True),
        _step(codebooks=3),
    ],
)
def test_every_step_message_fault_is_one_message_error_with_one_label(msg):
    with pytest.raises(MessageError) as raised:
        parse_step_request(msg, rates=CODEBOOKS)
    assert failure_class(raised.value) == "invalid_message"
    # The same fault after retries (the retried step) keeps its label.
    gave_up = GaveUp(raised.value.message, 3)
    gave_up.__cause__ = raised.value
    assert failure_class(gave_up) == "invalid_message"


def test_step_request_carries_the_checked_rate():
    assert parse_step_request(_step(codebooks=2), rates=CODEBOOKS).rate == 2
    assert parse_step_request(_step(codebooks="x")).rate is None  # no knob: not read


@pytest.mark.parametrize(
    ("err", "label"),
    [
        (MessageError("m"), "invalid_message"),
        (UnknownWorkflow("w"), "unknown_workflow"),
        (InvalidInput("i"), "input_error"),
        (ServerUnavailable("s"), "transient_exhausted"),
        (ConnectionError("c"), "transient_exhausted"),
        (RuntimeError("r"), "internal"),
    ],
)
def test_the_error_class_decides_the_label(err, label):
    assert failure_class(err) == label
