"""arq-deploy: certified-robust mixed-precision quantization, export, compilation and certification.

Importing this package is cheap: torch, onnxruntime and TVM are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
