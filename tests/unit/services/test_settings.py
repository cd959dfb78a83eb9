"""Each service builds one settings object from its flags, and refuses what cannot work."""

from __future__ import annotations

import pytest

from nec_cli.main import build_parser
from nec_controller.main import ControllerSettings
from nec_serve.errors import InvalidInput
from nec_serve.imagery import InputLimits
from nec_wrapper.main import settings_from_args

WRAPPER = ["wrapper", "--mode", "compress", "--model-dir", "m", "--bootstrap", "k:9092"]


def _wrapper(*extra: str):
    return settings_from_args(build_parser().parse_args([*WRAPPER, *extra]))


def _controller(*extra: str) -> ControllerSettings:
    args = build_parser().parse_args(["controller", "--bootstrap", "k:9092", *extra])
    return ControllerSettings.from_args(args)


def test_wrapper_settings_carry_every_flag():
    s = _wrapper("--config-dir", "cfg", "--bands", "3,2,1", "--max-tiles", "7", "--port", "0")
    assert s.bands == (3, 2, 1) and s.limits == InputLimits(max_tiles=7)
    assert (s.trigger, s.port, s.group) == ("http", 0, "nec-wrapper-compress")
    assert str(s.config_dir) == "cfg" and s.namespace is None
    assert (s.host, s.metrics_port) == ("127.0.0.1", 9090)  # metrics on by default
    off = _wrapper("--config-dir", "cfg", "--metrics-port", "0", "--host", "0.0.0.0")
    assert (off.host, off.metrics_port) == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--config-dir", "c", "--bands", "1,x"], "invalid --bands '1,x'"),
        (["--config-dir", "c", "--bands", "0,1"], "band indices start at 1"),
        (["--config-dir", "c", "--max-pixels", "0"], "max_pixels"),
        (["--config-dir", "c", "--attempts", "0"], "attempts"),
        (["--config-dir", "c", "--port", "70000"], "invalid wrapper port 70000"),
        (["--config-dir", "c", "--metrics-port", "70000"], "invalid wrapper metrics port 70000"),
        ([], "give --config-dir"),
    ],
)
def test_wrapper_settings_refuse_what_cannot_work(extra, match):
    with pytest.raises(InvalidInput, match=match):
        _wrapper(*extra)


def test_controller_settings():
    s = _controller("--config-dir", "cfg", "--sink", "nec-compress=http://127.0.0.1:8080")
    assert s.sinks == (("nec-compress", "http://127.0.0.1:8080"),)
    assert _controller("--kubernetes").kubernetes
    assert (s.host, s.metrics_port) == ("127.0.0.1", 9091)
    s = _controller("--kubernetes", "--host", "0.0.0.0", "--metrics-port", "0")
    assert (s.host, s.metrics_port) == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--config-dir", "c", "--sink", "nec-compress"], "expected SERVICE=http"),
        (["--config-dir", "c", "--sink", "x=ftp://h"], "expected SERVICE=http"),
        (["--config-dir", "c", "--attempts", "0"], "--attempts 0"),
        (["--config-dir", "c", "--metrics-port", "-1"], "--metrics-port -1"),
        ([], "local mode needs --config-dir"),
    ],
)
def test_controller_settings_refuse_what_cannot_work(extra, match):
    with pytest.raises(InvalidInput, match=match):
        _controller(*extra)
