"""Triton Python-backend model that runs an exported graph (onnxruntime or PyTorch).

Triton's ``onnxruntime`` backend ships only in NVIDIA's containers; the ``tritonserver``
bundled with PyTriton has the Python backend alone. ``nec-serve export`` therefore also
writes ``model_repository_local/``, whose models are this file plus the same
``model.onnx``: real Triton (its HTTP/gRPC protocol, dynamic batching, statistics) around
the same graph. The file is loaded by Triton as ``<model>/1/model.py``; it imports only
numpy, onnxruntime and Triton's own ``triton_python_backend_utils``.

``export --torch-runtime`` also writes ``model_repository_torch/``: this file with the
parameter ``runtime: torch`` runs the PyTorch graph instead, on the GPU when there is one.
That is how the bundled server serves NEC from a GPU machine that has PyTorch with CUDA
but neither NVIDIA's Triton container nor a CUDA build of onnxruntime.

With dynamic batching Triton hands ``execute`` several requests at once; their inputs are
concatenated along the batch axis, run in one onnxruntime call and split back, so batching
happens on the server as it would with the onnxruntime backend.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class _OnnxGraph:
    """``model.onnx`` beside this file, run by onnxruntime on the CPU."""

    def __init__(self, version_dir: Path, params: dict, input_name: str, output_names: list):
        import onnxruntime as ort  # heavy; imported by the model instance that runs it

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count", "0"))
        path = version_dir / "model.onnx"
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name, self.output_names = input_name, output_names
        self.device = "cpu"

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})


class _TorchGraph:
    """The same graph in PyTorch (``runtime: torch``), on the GPU when there is one.

    It rebuilds the registered architecture, loads ``weights.pt`` beside this file and
    runs the module of the config's ``role`` parameter (a graph role of the model contract);
    ``device: auto`` picks the GPU if PyTorch sees one, else the CPU.

    Needs ``torch``, ``nec_models``, ``nec_export`` and ``nec_serve`` importable by the
    backend's Python. ``precision`` bf16/fp16 runs under autocast: faster on a GPU, but
    symbols then differ from the fp32 export at rounding boundaries, so it is for
    throughput measurements.
    """

    def __init__(self, version_dir: Path, params: dict, output_names: list):
        # Imported here, not at the top: the onnxruntime path above runs in a Triton whose
        # Python may have neither PyTorch nor the project's packages.
        import torch

        from nec_export.plan import graph_module
        from nec_models import create_model, load_checkpoint
        from nec_serve.contract import GraphRole

        want = params.get("device", "auto")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, and PyTorch sees no GPU")
        self.torch, self.device = torch, torch.device(want)
        threads = int(params.get("intra_op_thread_count", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        kwargs = json.loads(params.get("model_kwargs", "{}"))
        model = create_model(params["nec_model"], img_size=int(params["img_size"]), **kwargs)
        load_checkpoint(model, version_dir / "weights.pt")
        module = graph_module(model, GraphRole.of(params["role"]))
        self.module = module.eval().to(self.device)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.get("precision"))
        self.output_names = output_names

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, self.amp, enabled=self.amp is not None),
        ):
            out = self.module(x)
        outs = out if isinstance(out, tuple) else (out,)
        arrays = [
            o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs
        ]
        return arrays[: len(self.output_names)]


class TritonPythonModel:
    """One exported graph behind Triton's Python backend (onnxruntime, or PyTorch)."""

    def initialize(self, args):
        """Load the graph beside this file with the configured runtime and threads."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        if params.get("runtime", "onnxruntime") == "torch":
            self.graph = _TorchGraph(version_dir, params, self.output_names)
        else:
            self.graph = _OnnxGraph(version_dir, params, self.input_name, self.output_names)

    def execute(self, requests):
        """Run all queued requests as one batch; answer each with its slice."""
        arrays, sizes = [], []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            arrays.append(arr)
            sizes.append(arr.shape[0])
        try:
            outputs = self.graph.run(np.concatenate(arrays))
        except Exception as err:  # onnxruntime's and PyTorch's errors are RuntimeErrors
            error = pb_utils.TritonError(f"{type(self.graph).__name__} failed: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for request, n in zip(requests, sizes, strict=True):
            wanted = set(request.requested_output_names()) or set(self.output_names)
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + n]))
                for name, out in zip(self.output_names, outputs, strict=True)
                if name in wanted
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
