"""spectrt.runtime: load an engine bundle and run the draft-then-verify loop.

Must import with only numpy, tokenizers and a backend (onnxruntime / tensorrt) installed.
"""
