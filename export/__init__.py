"""Exported encoders: a train.py checkpoint's two encoders as ONNX or TorchScript files that map images and token ids
to the retrieval feature, with the tokeniser's files and export.json (scripts/export.py is the command line), and the
loader that runs an exported ONNX folder in onnxruntime without building CFine (docs/export.md)."""
