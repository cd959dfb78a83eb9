from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nec_export import ExportOptions, export_model
from nec_export.families.nec import tables_from_model
from nec_export.graphs import check_graph
from nec_export.triton import DataType, ModelConfig, TensorSpec, cpu_config, to_pbtxt
from nec_models import create_model
from nec_serve.contract import GraphRole, Manifest
from nec_serve.errors import ExportCheckFailed, InvalidInput
from nec_serve.tables import EntropyTables


def _parse(text: str) -> model_config_pb2.ModelConfig:
    # Triton's own message: an unknown or misspelt field raises ParseError.
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_manifest_records_parity_and_hashes(tiny_export):
    man = Manifest.load(tiny_export)
    enc = man.graph(GraphRole.ENCODER).parity
    assert enc["symbols_total"] == 4 * 64 * 17
    assert enc["max_abs_err"] <= enc["atol"] == 1e-3
    assert enc["symbol_mismatches"] == enc["mismatches_near_half"]
    for role in (GraphRole.DECODER, GraphRole.FEATURES):
        assert man.graph(role).parity["max_abs_err"] <= 1e-4
    tables = EntropyTables.load(tiny_export / "entropy_tables.bin")
    assert man.entropy.sha256 == tables.sha256
    assert man.entropy.kind == "factorized" and man.family == "nec"
    params = man.family_params
    assert (params.tokens, params.channels, man.input.img_size) == (17, 64, 32)
    # The file holds what the export returned, in the contract's JSON form.
    on_disk = json.loads((tiny_export / "manifest.json").read_text())
    assert Manifest.from_dict(on_disk) == man and on_disk == man.to_dict()


@pytest.mark.parametrize("variant", ["gpu", "cpu", "local"])
def test_repository_layout_and_configs_parse_as_triton_model_config(tiny_export, variant):
    repo = tiny_export / f"model_repository_{variant}"
    names = [g.name for g in Manifest.load(tiny_export).graphs.values()]
    assert sorted(names) == ["nec_decoder", "nec_decoder_block1", "nec_encoder"]  # no head
    assert sorted(p.name for p in repo.iterdir()) == names
    for name in names:
        cfg = _parse((repo / name / "config.pbtxt").read_text())
        assert cfg.name == name
        assert cfg.backend == ("python" if variant == "local" else "onnxruntime")
        assert (repo / name / "1" / "model.py").exists() == (variant == "local")
        model = repo / name / "1" / "model.onnx"
        onnx.checker.check_model(onnx.load(str(model)), full_check=True)
        assert (repo / name / "1" / "entropy_tables.bin").exists()
        group = cfg.instance_group[0]
        if variant == "gpu":
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
            assert accel.name == "tensorrt"
            assert accel.parameters["precision_mode"] == "FP16"
            assert accel.parameters["trt_engine_cache_enable"] == "1"
            assert cfg.max_batch_size == 32
        else:
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
            assert cfg.parameters["intra_op_thread_count"].string_value == "0"
            assert cfg.max_batch_size == 8
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        # Config tensors agree with what the ONNX graph declares (batch axis dynamic).
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for spec, arg in zip(cfg.input, sess.get_inputs(), strict=True):
            assert spec.name == arg.name
            assert list(spec.dims) == arg.shape[1:]
            assert isinstance(arg.shape[0], str)  # symbolic batch
        assert [o.name for o in cfg.output] == [o.name for o in sess.get_outputs()]


def test_gpu_and_cpu_repositories_share_graph_files(tiny_export):
    a = tiny_export / "model_repository_gpu" / "nec_encoder" / "1" / "model.onnx"
    b = tiny_export / "model_repository_cpu" / "nec_encoder" / "1" / "model.onnx"
    assert a.read_bytes() == b.read_bytes()
    assert os.stat(a).st_ino == os.stat(b).st_ino  # hard links: no second copy


def test_encoder_graph_runs_any_batch_and_matches_pytorch(tiny_export, tiny_model):
    sess = ort.InferenceSession(
        str(tiny_export / "onnx" / "nec_encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 3, 9):
        x = torch.randn(batch, 3, 32, 32)
        symbols, latent = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref_lat = tiny_model.latent(x)
            ref_sym = tiny_model.symbols(ref_lat)
        assert symbols.dtype == np.int32 and symbols.shape == (batch, 64, 17)
        np.testing.assert_allclose(latent, ref_lat.numpy(), atol=1e-3)
        assert (symbols != ref_sym.numpy()).sum() == 0


def test_decoder_graph_is_exact_dequantization(tiny_export, tiny_model):
    sess = ort.InferenceSession(
        str(tiny_export / "onnx" / "nec_decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    sym = np.random.default_rng(0).integers(-20, 20, size=(2, 64, 17), dtype=np.int32)
    (emb,) = sess.run(None, {"symbols": sym})
    medians = tiny_model.medians().numpy()
    ref = sym.astype(np.float32) + medians[None, :, None]  # float32 sum, as the graph
    np.testing.assert_array_equal(emb, ref.transpose(0, 2, 1))


def test_tables_match_compressai_buffers(tiny_model):
    tables = tables_from_model(tiny_model)
    eb = tiny_model.bottleneck
    np.testing.assert_array_equal(tables.quantized_cdf, eb._quantized_cdf.numpy())
    np.testing.assert_array_equal(tables.offset, eb._offset.numpy())
    np.testing.assert_array_equal(tables.cdf_length, eb._cdf_length.numpy())
    assert EntropyTables.from_bytes(tables.to_bytes()).sha256 == tables.sha256


def test_hyperprior_export_is_refused_with_reason(tmp_path):
    with pytest.raises(InvalidInput, match="hyperprior"):
        export_model(create_model("mae_vit_compress_hyperprior_adapter_tiny"), tmp_path)


@pytest.mark.slow
def test_classifier_exports_its_backbone(tmp_path):
    model = create_model("vit_base_compressed_tiny", with_decoder=True)
    man = export_model(model, tmp_path)
    assert man.model == "vit_base_compressed_tiny"
    assert man.graph(GraphRole.FEATURES).parity["max_abs_err"] <= 1e-4


def test_parity_check_fails_on_a_graph_that_differs(tiny_export, tiny_model):
    class Shifted(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, symbols):
            return self.m.dequantize(symbols) + 1e-2

    sym = torch.zeros(2, 64, 17, dtype=torch.int32)
    with pytest.raises(ExportCheckFailed, match="differs from PyTorch"):
        check_graph(
            "nec_decoder", Shifted(tiny_model), tiny_export / "onnx" / "nec_decoder.onnx", sym
        )


def test_pbtxt_writer_round_trips_through_triton_proto():
    cfg = cpu_config(
        'quote"name',
        (TensorSpec("x", DataType.TYPE_FP32, (3, -1)),),
        (TensorSpec("y", DataType.TYPE_INT32, (5,)),),
        max_batch_size=4,
    )
    parsed = _parse(to_pbtxt(cfg))
    assert parsed.name == 'quote"name'
    assert list(parsed.input[0].dims) == [3, -1]
    assert parsed.output[0].data_type == model_config_pb2.TYPE_INT32
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4]


def test_invalid_config_values_are_rejected():
    with pytest.raises(ValueError, match="invalid dims"):
        ModelConfig("m", "onnxruntime", 1, (TensorSpec("x", DataType.TYPE_FP32, ()),), ())
    with pytest.raises(ValueError, match="max_batch_size"):
        ModelConfig("m", "onnxruntime", -1, (), ())
    with pytest.raises(text_format.ParseError):
        _parse('name: "m"\nmax_batch_sizes: 3\n')


def test_calibration_fits_the_bottleneck_to_real_latents(data_dir):
    from nec_export.calibrate import calibrate_from_inputs
    from nec_serve.imagery import iter_inputs

    torch.manual_seed(3)
    model = create_model("mae_vit_compress_adapter_tiny")
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if "bottleneck" not in k}
    inputs = iter_inputs(data_dir / "naip" / "m_4709963_se_14_1_20090818.tif", [1, 2, 3])
    report = calibrate_from_inputs(model, inputs, max_tiles=16, steps=60)
    assert report.tiles == 16 and report.symbols_per_channel == 16 * 17
    # The initial density is broad; fitted to the latents it codes them in fewer bits.
    assert report.bits_per_symbol_after < 0.7 * report.bits_per_symbol_before
    # Only the bottleneck changed, and its tables were rebuilt for the new density.
    for k, v in encoder_before.items():
        assert torch.equal(v, model.state_dict()[k]), k
    tables = tables_from_model(model)
    assert tables.channels == 64 and tables.cdf_length.min() >= 3


def test_calibration_refuses_wrong_band_count(data_dir):
    from nec_export.calibrate import calibrate_from_inputs
    from nec_serve.imagery import iter_inputs

    model = create_model("mae_vit_compress_adapter_tiny")
    inputs = iter_inputs(data_dir / "naip" / "m_4709963_se_14_1_20090818.tif")
    with pytest.raises(InvalidInput, match="has 4 bands"):
        calibrate_from_inputs(model, inputs)


@pytest.mark.slow
def test_vit_b_exports_at_256_px_with_exact_symbols(tmp_path):
    # The real workload: ViT-B/16 with its position embeddings interpolated to 256 px.
    src = create_model("mae_vit_compress_adapter").state_dict()
    from nec_models import load_checkpoint

    model = load_checkpoint(create_model("mae_vit_compress_adapter", img_size=256), src)
    man = export_model(model, tmp_path, ExportOptions(check_batch=2))
    enc = man.graph(GraphRole.ENCODER).parity
    assert (man.family_params.tokens, man.family_params.channels) == (257, 768)
    assert enc["symbols_total"] == 2 * 768 * 257
    assert enc["max_abs_err"] < 1e-4
    assert enc["symbol_mismatches"] == enc["mismatches_near_half"] <= 1
    cfg = _parse((tmp_path / "model_repository_gpu/nec_encoder/config.pbtxt").read_text())
    assert list(cfg.input[0].dims) == [3, 256, 256]
    assert list(cfg.output[0].dims) == [768, 257]


def test_code_parity_tolerates_flips_at_ties_only_and_only_a_few(tmp_path):
    from nec_export.graphs import judge_codes

    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"graph")
    ref = np.zeros((4, 1024), np.int32)
    lat = np.zeros((4, 8, 1024), np.float32)
    ties = np.zeros(ref.shape, bool)
    ties[0, :4] = True  # four positions PyTorch itself had on an edge
    got = ref.copy()
    got[0, :2] = 1  # two of them flipped (0.05 % of the symbols): what backends do
    report = judge_codes("enc", graph, "indices", (ref, got), (lat, lat), got != ref, ties)
    assert (report.symbol_mismatches, report.mismatches_near_half) == (2, 2)
    got[0, :4] = 1  # all four: beyond half of the ties and beyond the fraction
    with pytest.raises(ExportCheckFailed, match="indices differ"):
        judge_codes("enc", graph, "indices", (ref, got), (lat, lat), got != ref, ties)
    got = ref.copy()
    got[1, 0] = 1  # one flip where there was no tie
    with pytest.raises(ExportCheckFailed, match="indices differ"):
        judge_codes("enc", graph, "indices", (ref, got), (lat, lat), got != ref, ties)
