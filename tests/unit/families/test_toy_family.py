"""A third model family written only in its own modules (tests/toyfamily) runs end to end.

Nothing outside ``toyfamily`` and this test knows the family: export plans it through its
exporter, the CLI compresses and decompresses with it, and a wrapper step on the real
broker and S3 serves it.
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
import warnings

import numpy as np
import pytest
import rasterio

from nec_cli.main import main as nec_serve
from nec_export import export_model, plan
from nec_serve import contract
from nec_serve.bundle import ModelBundle

SCENE = "ssl4eo_s12/ssl4eos12_val_0080717_0.tif"
BANDS = (2, 3)


@pytest.fixture(scope="module")
def toy():
    """The toy family's modules, imported as a plug-in is; unregistered afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        contract.model_families(), plan.exporters()  # the built-in families first
        mp.setattr(contract, "_FAMILIES", dict(contract._FAMILIES))
        mp.setattr(plan, "_EXPORTERS", dict(plan._EXPORTERS))
        runtime = importlib.import_module("toyfamily.runtime")
        torch_side = importlib.import_module("toyfamily.torch_side")
        yield runtime, torch_side
        for name in ("toyfamily.torch_side", "toyfamily.runtime"):
            sys.modules.pop(name)
    # Later tests (the k8s overlays' drift check, ...) see the built-in families only.
    assert "toy" not in {f.name for f in contract.model_families()}


@pytest.fixture(scope="module")
def toy_export(toy, tmp_path_factory):
    runtime, torch_side = toy
    out = tmp_path_factory.mktemp("toy") / "toy_pool"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = export_model(torch_side.ToyPool(), out)
    assert manifest.family == "toy" and contract.model_family("toy") is runtime.TOY
    return out


def _check_decoded(decoded: np.ndarray, scene, bundle) -> None:
    """Equal to the toy codec's output, but at rounding ties (one step, 500, apart)."""
    diff = np.abs(decoded - _expected(scene, bundle))
    assert diff.max() <= 500 and (diff <= 1).mean() > 0.99


def _expected(scene, bundle) -> np.ndarray:
    """What the toy codec gives back: 2x2 means, quantized, in 16-bit pixels."""
    with rasterio.open(scene) as src:
        raw = src.read(list(BANDS)).astype(np.float64)
    inp = bundle.manifest.input
    mean, std = np.array(inp.mean)[:, None, None], np.array(inp.std)[:, None, None]
    h, w = raw.shape[1:]
    padded = np.zeros((len(BANDS), -(-h // 8) * 8, -(-w // 8) * 8))
    padded[:, :h, :w] = (raw / 10000 - mean) / std
    c, hh, ww = padded.shape
    pooled = padded.reshape(c, hh // 2, 2, ww // 2, 2).mean((2, 4))
    q = np.clip(np.round(pooled * 4), -8, 7) / 4
    up = q.repeat(2, 1).repeat(2, 2)[:, :h, :w]
    return np.clip(np.rint((up * std + mean) * 10000), 0, 65535)


def test_toy_family_exports_compresses_and_decompresses_through_the_cli(
    toy_export, data_dir, tmp_path, capsys
):
    """Export manifest, CLI compress and decompress: the family's default output, bands."""
    scene = data_dir / SCENE
    container, out = tmp_path / "scene.necb", tmp_path / "scene.tif"
    band_flag = ",".join(map(str, BANDS))
    args = ["--model-dir", str(toy_export), "-q"]
    assert (
        nec_serve(["compress", str(scene), "--out", str(container), "--bands", band_flag, *args])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "toy" and report["tiles"] > 1
    assert nec_serve(["decompress", str(container), "--out", str(out), *args]) == 0
    bundle = ModelBundle.load(toy_export)
    with rasterio.open(out) as got:
        assert got.count == 2 and got.dtypes[0] == "uint16"
        assert got.descriptions == ("T1", "T2")
        decoded = got.read().astype(np.float64)
    _check_decoded(decoded, scene, bundle)
    with pytest.raises(SystemExit):  # the toy family has no rate knob
        nec_serve(["compress", str(scene), "--out", str(container), "--quality", "2", *args])


def test_toy_family_serves_a_wrapper_step_on_the_real_broker_and_s3(
    toy_export, data_dir, kafka, s3, producer, tmp_path
):
    """Compress then decompress steps of a workflow serving the toy family."""
    from nec_serve.config_store import LocalConfigStore
    from nec_serve.messages import config_name, parse_workflow
    from nec_wrapper.step import StepHandler, WrapperSettings

    u = uuid.uuid4().hex[:8]
    bucket, client = f"toy-{u}", s3.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="input/scene.tif", Body=(data_dir / SCENE).read_bytes())
    store = LocalConfigStore(tmp_path / "store")
    names = {}
    for component in ("toy-compress", "toy-decompress"):
        topic = f"wf{u}.{component}"
        store.put(
            parse_workflow(
                {
                    "workflow_status": "published",
                    "workflow_name": f"wf-{u}-{component}",
                    "Topics": {"in": topic, "out": f"{topic}.out"},
                    "ML": {
                        "ServiceName": component,
                        "Namespace": "nec",
                        "component_name": component,
                    },
                    "S3_bucket": {
                        "aws_access_key_id": s3.access_key,
                        "aws_secret_access_key": s3.secret_key,
                        "s3-bucket-name": bucket,
                        "region_name": s3.region,
                        "endpoint_url": s3.endpoint_url,
                    },
                }
            )
        )
        names[component] = config_name(topic)

    def handler(mode):
        settings = WrapperSettings(
            mode=mode,
            model_dir=toy_export,
            bootstrap_servers=kafka.bootstrap_servers,
            status_topic=f"status{u}",
            dead_letter_topic=f"dlq{u}",
            backoff_s=0.1,
            bands=BANDS if mode == "compress" else None,
        )
        return StepHandler(settings, store, producer)

    step = {
        "previous_component_end": True,
        "S3_bucket_desc": {"folder": "input", "filename": "scene.tif"},
        "meta_information": {},
    }
    done = handler("compress").handle(names["toy-compress"], json.dumps(step).encode())
    assert done.done and done.status == "finished", done.reason
    assert done.output_key == "result-toy-compress/scene.necb"
    step["S3_bucket_desc"] = {"folder": "result-toy-compress", "filename": "scene.necb"}
    done = handler("decompress").handle(names["toy-decompress"], json.dumps(step).encode())
    assert done.done and done.status == "finished", done.reason
    assert done.output_key == "result-toy-decompress/scene.tif"
    body = client.get_object(Bucket=bucket, Key=done.output_key)["Body"].read()
    path = tmp_path / "out.tif"
    path.write_bytes(body)
    with rasterio.open(path) as got:
        decoded = got.read().astype(np.float64)
    _check_decoded(decoded, data_dir / SCENE, ModelBundle.load(toy_export))
