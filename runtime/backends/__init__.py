"""Backends run one decoder graph step against a KV cache. See base.Decoder."""
