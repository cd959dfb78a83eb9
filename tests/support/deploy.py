"""What the ``nec-serve deploy`` tests share: a fake Triton repository and its names."""

from __future__ import annotations

from pathlib import Path

GRAPHS = ("nec_decoder", "nec_decoder_block1", "nec_encoder")
BUCKET = "nec-models"


def fake_repo(root: Path, models=GRAPHS) -> Path:
    repo = root / "model_repository_cpu"
    for m in models:
        (repo / m / "1").mkdir(parents=True)
        (repo / m / "config.pbtxt").write_text(f'name: "{m}"\nbackend: "onnxruntime"\n')
        (repo / m / "1" / "model.onnx").write_bytes(b"onnx")
    return repo
