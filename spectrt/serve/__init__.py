"""Serving: an OpenAI-compatible HTTP server with Prometheus metrics (`spectrt serve`), and a Triton
Inference Server model repository writer (`spectrt triton-repo`)."""
