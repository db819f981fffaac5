"""Export (torch -> ONNX): write, stamp metadata, verify against torch, optionally quantise."""
