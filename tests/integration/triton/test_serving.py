"""The exported graphs on a real tritonserver (the one bundled with PyTriton), end to end."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import warnings

import numpy as np
import pytest

from nec_dev.triton import LocalTritonServer, free_port
from nec_serve.bundle import ModelBundle
from nec_serve.contract import GraphRole
from nec_serve.engines import LocalEngine
from nec_serve.errors import InvalidInput, ModelMismatch, ServerUnavailable
from nec_serve.imagery import read_raster
from nec_serve.pipeline import compress, decompress
from nec_serve.serving.client import TritonEngine, parse_server_url

NAIP = "naip/m_4709963_se_14_1_20180716.tif"


@pytest.fixture(scope="module")
def server(tiny_export):
    with LocalTritonServer(tiny_export / "model_repository_local") as srv:
        yield srv


@pytest.fixture(scope="module")
def bundle(tiny_export):
    return ModelBundle.load(tiny_export)


@pytest.fixture(scope="module")
def scene(data_dir):
    return read_raster(data_dir / NAIP, [1, 2, 3])[:, :96, :160]  # 3 x 5 tiles of 32 px


def _urls(server):
    return [f"grpc://{server.grpc_url}", f"http://{server.http_url}"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_symbols_equal_in_process_onnxruntime(server, bundle, protocol):
    url = dict(zip(("grpc", "http"), _urls(server), strict=True))[protocol]
    images = np.random.default_rng(1).standard_normal((20, 3, 32, 32)).astype(np.float32)
    with TritonEngine(url, bundle) as remote:
        symbols, latent = remote.encode(images)  # 20 > max_batch_size 8: split by the client
        only = remote.encode_symbols(images[:3])
        emb = remote.decode(GraphRole.DECODER, symbols)
    ref_sym, ref_lat = LocalEngine(bundle).encode(images)
    assert symbols.dtype == np.int32 and symbols.shape == (20, 64, 17)
    np.testing.assert_array_equal(symbols, ref_sym)
    np.testing.assert_array_equal(only, ref_sym[:3])
    np.testing.assert_allclose(latent, ref_lat, atol=1e-5)
    np.testing.assert_array_equal(emb, LocalEngine(bundle).decode(GraphRole.DECODER, ref_sym))


@pytest.mark.parametrize(("protocol", "shm"), [("grpc", False), ("http", False), ("grpc", True)])
def test_remote_containers_are_byte_identical(server, bundle, scene, protocol, shm):
    url = dict(zip(("grpc", "http"), _urls(server), strict=True))[protocol]
    local = io.BytesIO()
    compress([("scene", scene)], bundle, LocalEngine(bundle), local, batch_size=4)
    remote = io.BytesIO()
    with TritonEngine(url, bundle, shared_memory=shm) as engine:
        stats = compress([("scene", scene)], bundle, engine, remote, batch_size=4)
        _, records, emb = decompress(io.BytesIO(remote.getvalue()), bundle, engine)
    assert stats.tiles == 15
    assert remote.getvalue() == local.getvalue()
    assert emb.shape == (15, 17, 64) and len(records) == 15


def test_cli_compress_with_server_flag(server, tiny_export, tmp_path, scene, capsys):
    from nec_cli.main import main

    src = tmp_path / "scene.npy"
    np.save(src, scene)
    outs = []
    for extra in ([], ["--server", f"grpc://{server.grpc_url}"]):
        out = tmp_path / f"c{len(outs)}.necb"
        code = main(
            ["compress", str(src), "--model-dir", str(tiny_export), "--out", str(out), "-q", *extra]
        )
        assert code == 0, capsys.readouterr().err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_request_larger_than_max_batch_is_refused_by_the_server(server):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(server.grpc_url)
    inp = tc.InferInput("images", [9, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((9, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
        client.infer("nec_encoder", [inp])


def test_server_not_running_is_a_clear_bounded_error(bundle):
    url = f"grpc://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=rf"{url}.*after 2 attempts"):
        TritonEngine(url, bundle, retries=1, backoff_s=0.1).encode(
            np.zeros((1, 3, 32, 32), np.float32)
        )
    assert time.monotonic() - t0 < 10
    http = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match=http):
        TritonEngine(http, bundle, retries=1, backoff_s=0.1).encode(
            np.zeros((1, 3, 32, 32), np.float32)
        )


def test_missing_model_version_is_named(server, bundle):
    engine = TritonEngine(f"grpc://{server.grpc_url}", bundle, model_version="7")
    with pytest.raises(
        ModelMismatch, match=r"'nec_encoder' \(version 7\) is not ready.*nec_decoder"
    ):
        engine.encode(np.zeros((1, 3, 32, 32), np.float32))


def test_export_that_does_not_match_the_served_model(server, tiny_export, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["graphs"]["encoder"]["inputs"][0]["dims"] = [3, 64, 64]
    manifest["input"]["img_size"] = 64  # a consistent manifest, just not the served model's
    (other / "manifest.json").write_text(json.dumps(manifest))
    engine = TritonEngine(f"http://{server.http_url}", ModelBundle.load(other))
    with pytest.raises(ModelMismatch, match=r"does not match the export.*\[-1, 3, 64, 64\]"):
        engine.encode(np.zeros((1, 3, 64, 64), np.float32))


def test_wrong_tensor_shape_is_invalid_input_without_retry(server, bundle):
    engine = TritonEngine(f"grpc://{server.grpc_url}", bundle, retries=3, backoff_s=5)
    t0 = time.monotonic()
    with pytest.raises(InvalidInput, match="refused a nec_encoder request of shape"):
        engine.encode(np.zeros((2, 3, 16, 16), np.float32))
    assert time.monotonic() - t0 < 5  # not retried


def test_invalid_server_urls():
    for url in ("ftp://h:1", "grpc://host", "http://:80"):
        with pytest.raises(InvalidInput, match="invalid server URL"):
            parse_server_url(url)
    assert parse_server_url("localhost:8001") == ("grpc", "localhost:8001")


def test_server_killed_mid_run_fails_after_bounded_retries(tiny_export, bundle):
    srv = LocalTritonServer(tiny_export / "model_repository_local").start()
    try:
        engine = TritonEngine(
            f"grpc://{srv.grpc_url}", bundle, retries=2, backoff_s=0.2, timeout_s=5
        )
        images = np.zeros((8, 3, 32, 32), np.float32)
        engine.encode(images)  # warm: checks done, connection open
        outcome: dict = {}

        def run():
            t0 = time.monotonic()
            try:
                for _ in range(100_000):
                    engine.encode(images)
                outcome["error"] = None
            except Exception as err:  # the assertion below names the type
                outcome["error"] = err
            outcome["seconds"] = time.monotonic() - t0

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        srv.kill()
        worker.join(timeout=60)
        assert not worker.is_alive(), "client hung after the server died"
        assert isinstance(outcome["error"], ServerUnavailable), outcome
        assert "after 3 attempts" in str(outcome["error"])
    finally:
        srv.close()


def test_server_start_failure_reports_its_log(tmp_path):
    from nec_dev.triton import ServerStartError

    bad = tmp_path / "repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_sizes: 1\n')
    with pytest.raises(ServerStartError, match="tritonserver exited"):
        LocalTritonServer(tmp_path / "repo").start(timeout=60)


def test_torch_runtime_repository_serves_the_same_graphs(tiny_model, tmp_path, scene):
    """export --torch-runtime: the Python backend runs the PyTorch graphs (here on the CPU)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from nec_export import ExportOptions, export_model
    from nec_serve.imagery import Normalisation, tile_image

    out = tmp_path / "export"
    with warnings.catch_warnings():  # torch.jit.script deprecation, as in conftest
        warnings.simplefilter("ignore")
        export_model(tiny_model, out, ExportOptions(torch_runtime=True, torch_device="cpu"))
    repo = out / "model_repository_torch"
    cfg = text_format.Parse(
        (repo / "nec_encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["runtime"] == "torch" and params["graph"] == "nec_encoder"
    assert params["role"] == GraphRole.ENCODER.value
    assert params["nec_model"] == "mae_vit_compress_adapter_tiny" and params["device"] == "cpu"
    assert (repo / "nec_decoder" / "1" / "weights.pt").is_file()

    bundle = ModelBundle.load(out)
    tiles, _ = tile_image(scene, 32)
    images = Normalisation.for_dtype(scene.dtype, 3).apply(tiles).astype(np.float32)
    ref_sym, ref_lat = LocalEngine(bundle).encode(images)
    with LocalTritonServer(repo) as srv, TritonEngine(f"grpc://{srv.grpc_url}", bundle) as eng:
        symbols, latent = eng.encode(images)
        emb = eng.decode(GraphRole.DECODER, symbols)
        feats = eng.decode(GraphRole.FEATURES, symbols)
    # PyTorch is the reference the ONNX export was checked against: same symbols here.
    np.testing.assert_array_equal(symbols, ref_sym)
    np.testing.assert_allclose(latent, ref_lat, atol=1e-4)
    ref_emb = LocalEngine(bundle).decode(GraphRole.DECODER, ref_sym)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
    ref_feats = LocalEngine(bundle).decode(GraphRole.FEATURES, ref_sym)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4)


def test_torch_runtime_options_are_checked():
    from nec_export import ExportOptions

    with pytest.raises(InvalidInput, match="torch device 'tpu' is not auto, cuda or cpu"):
        ExportOptions(torch_runtime=True, torch_device="tpu")
    with pytest.raises(InvalidInput, match="torch precision 'int8' is not fp32, bf16 or fp16"):
        ExportOptions(torch_precision="int8")


def test_rvq_family_through_triton_is_byte_identical_and_decodes_the_same(
    rvq_export, data_dir, tmp_path
):
    """The RVQ encoder and decoder served by tritonserver give what onnxruntime gives."""
    from nec_serve.imagery import iter_inputs
    from nec_serve.pipeline import write_bands

    bundle = ModelBundle.load(rvq_export)
    src = data_dir / "bigearthnet" / "S2A_MSIL2A_20170617T113321_4_55"
    bands = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

    def run(engine, name):
        buf = io.BytesIO()
        compress(iter_inputs(src, bigearthnet_bands=bands), bundle, engine, buf, rate=5)
        (tmp_path / f"{name}.necb").write_bytes(buf.getvalue())
        write_bands(tmp_path / f"{name}.necb", tmp_path / f"{name}.tif", bundle, engine)
        return buf.getvalue(), (tmp_path / f"{name}.tif").read_bytes()

    local = run(LocalEngine(bundle), "local")
    with (
        LocalTritonServer(rvq_export / "model_repository_local") as srv,
        TritonEngine(f"grpc://{srv.grpc_url}", bundle) as engine,
    ):
        remote = run(engine, "remote")
    assert remote[0] == local[0]  # the same container, bit for bit
    assert remote[1] == local[1]  # and the same GeoTIFF


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_carry_the_message_id_to_triton(server, bundle, protocol):
    """The message being handled names Triton's request (KServe v2 echoes it in the answer)."""
    from nec_serve.logs import log_context

    url = dict(zip(("grpc", "http"), _urls(server), strict=True))[protocol]
    answered = []
    with TritonEngine(url, bundle) as remote:
        real = remote._client.infer

        def infer(*args, **kwargs):  # a spy: the real call, its answer's id noted
            result = real(*args, **kwargs)
            response = result.get_response()
            answered.append(response.get("id", "") if isinstance(response, dict) else response.id)
            return result

        remote._client.infer = infer
        images = np.zeros((2, 3, 32, 32), np.float32)
        with log_context(message_id="ab" * 16):
            remote.encode(images)
        remote.encode(images)
    assert answered == ["ab" * 16, ""]
