"""arq_deploy.export: QDQ ONNX export and its validation against the torch fake-quant model."""
