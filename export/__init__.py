"""Exporters of a trained RNPModel: SavedModel, TFLite, ONNX and TensorRT.

One command per target, each a thin absl CLI over importable functions::

    python -m export.saved_model ckpt/    # TF Serving: logits, actions, MACs
    python -m export.tflite ckpt/         # batch-1 CPU: one signature per branch
    python -m export.onnx ckpt/           # gather/scatter (dynamic batch) + batch-1 If
    python -m export.trt ckpt/            # TensorRT 10 engines from the ONNX

Every exporter verifies the artifact it wrote (reloaded SavedModel, TFLite
interpreter, onnxruntime) against `model.rollout` before it reports success
and never leaves a partial file behind. The shared pieces, one concept each:
`export.cli` (checkpoint loading, the knob and output flags, one-line
errors), `export.writing` (an export is one consistent set: staging, the
manifest, recovery after a kill), `export.verification` (the parity checks)
and `export.sliced_network` (the sliced graphs, executors of the one
rollout); `export.exceptions` holds their errors.
"""
