"""One declaration per setting (flags, topics) and one label per step-message fault (issue 21)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from nec_controller.main import ControllerSettings
from nec_controller.main import add_parser as add_controller
from nec_serve.config_store import UnknownWorkflow
from nec_serve.errors import InvalidInput, ServerUnavailable
from nec_serve.messages import (
    DEAD_LETTER_TOPIC,
    STATUS_TOPIC,
    MessageError,
    parse_step_request,
)
from nec_serve.metrics import failure_class
from nec_serve.retry import GaveUp
from nec_wrapper.main import add_parser as add_wrapper
from nec_wrapper.main import settings_from_args
from nec_wrapper.step import WrapperSettings

ROOT = Path(__file__).resolve().parents[1]

# A flag whose destination is not its setting's field name.
_ALIASES = {
    "backoff": "backoff_s",
    "bootstrap": "bootstrap_servers",
    "session_timeout": "session_timeout_s",
}


def _parser(add) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser()
    add(top.add_subparsers())
    return next(iter(top._subparsers._group_actions[0].choices.values()))


@pytest.mark.parametrize(
    ("add", "cls"), [(add_wrapper, WrapperSettings), (add_controller, ControllerSettings)]
)
def test_every_flag_default_is_its_settings_default(add, cls):
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    checked = 0
    for action in _parser(add)._actions:
        name = _ALIASES.get(action.dest, action.dest)
        if name in defaults and action.default is not None:
            assert action.default == defaults[name], action.option_strings
            checked += 1
    assert checked >= 5


def test_wrapper_group_and_session_timeout_go_through_the_settings(tmp_path):
    parser = _parser(add_wrapper)
    base = ["--mode=compress", "--model-dir=m", "--bootstrap=b", f"--config-dir={tmp_path}"]
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
        parse_step_request(msg, rate=_two_codebooks)
    assert failure_class(raised.value) == "invalid_message"
    # The same fault after retries (the retried step) keeps its label.
    gave_up = GaveUp(raised.value.message, 3)
    gave_up.__cause__ = raised.value
    assert failure_class(gave_up) == "invalid_message"


def test_step_request_carries_the_checked_rate():
    assert parse_step_request(_step(codebooks=2), rate=_two_codebooks).codebooks == 2
    assert parse_step_request(_step(codebooks="x")).codebooks is None  # no rate: not read


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
