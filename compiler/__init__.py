"""spectrt.compiler: draft + target model -> ONNX (explicit KV cache) -> TensorRT engines -> bundle.

Build-time only: this package may import torch, transformers, onnx and tensorrt (lazily).
"""
