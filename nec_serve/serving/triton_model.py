"""Triton Python-backend model that runs an exported NEC graph with onnxruntime.

Triton's ``onnxruntime`` backend ships only in NVIDIA's containers; the ``tritonserver``
bundled with PyTriton has the Python backend alone. ``nec-serve export`` therefore also
writes ``model_repository_local/``, whose models are this file plus the same
``model.onnx``: real Triton (its HTTP/gRPC protocol, dynamic batching, statistics) around
the same graph. The file is loaded by Triton as ``<model>/1/model.py``; it imports only
numpy, onnxruntime and Triton's own ``triton_python_backend_utils``.

With dynamic batching Triton hands ``execute`` several requests at once; their inputs are
concatenated along the batch axis, run in one onnxruntime call and split back, so batching
happens on the server as it would with the onnxruntime backend.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One ONNX graph behind Triton's Python backend."""

    def initialize(self, args):
        """Load ``model.onnx`` beside this file with the configured thread count."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count", "0"))
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        """Run all queued requests as one batch; answer each with its slice."""
        arrays, sizes = [], []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            arrays.append(arr)
            sizes.append(arr.shape[0])
        try:
            outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(arrays)})
        except Exception as err:  # onnxruntime's errors are plain RuntimeError subclasses
            error = pb_utils.TritonError(f"onnxruntime failed: {err}")
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
