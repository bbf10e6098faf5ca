"""`spectrt bench` on the constrained JSON-extraction workload (tiny bundle): every configuration generates under
each prompt's schema, grammar-forced drafters join, and summaries report forced-token share and validity."""

from __future__ import annotations

import json

import jsonschema

from spectrt.bench.report import write_report
from spectrt.bench.runner import BenchConfig, load_schemas, run_benchmark
from spectrt.workloads import load_workload


def test_json_extraction_workload_has_schemas_for_every_prompt():
    prompts = load_workload("json_extraction")
    schemas = load_schemas("json_extraction")
    assert len(prompts) >= 20 and set(schemas) == {p.id for p in prompts}
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert load_schemas("code") == {}


def test_constrained_benchmark(tiny_bundle, tmp_path):
    """Two short records in the json_extraction format (the shipped prompts exceed the tiny bundle's context)."""
    workload = tmp_path / "mini_json.jsonl"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "kind": {"enum": ["cat", "dog"]}},
              "required": ["name", "kind"], "additionalProperties": False}
    workload.write_text("\n".join(json.dumps(r) for r in [
        {"id": "j-1", "messages": [{"role": "user", "content": "The cat Tom."}], "schema": schema},
        {"id": "j-2", "prompt": "def add(a, b):", "schema": {"type": "array", "items": {"type": "integer"},
                                                             "maxItems": 3}},
    ]))
    config = BenchConfig(bundle=str(tiny_bundle), workloads=(str(workload),), drafts=("model", "ngram"),
                         widths=("auto", 2), max_new_tokens=24, repeats=1, warmup=0, prompts=2, threads=1,
                         out=str(tmp_path / "out"), peer="none")
    results = run_benchmark(config, say=lambda m: None)
    data = json.loads(write_report(results, tmp_path / "out")["json"].read_text())
    workload = data["workloads"][str(workload)]
    assert workload["constrained"] == "json_schema"
    summaries = {s["config"]: s for s in workload["summaries"]}
    if data["exactness"]["strategy"] == "pad":  # this CPU needs row-count shaping: its cost is measured too
        assert summaries.pop("plain-unshaped")["prompts"] == 2
    assert list(summaries) == ["plain", "model@auto", "model@2", "ngram@auto", "ngram@2", "grammar@auto",
                               "grammar@2", "grammar+model@auto", "grammar+model@2", "grammar+ngram@auto",
                               "grammar+ngram@2"]
    for label, s in summaries.items():
        assert s["exact_match_with_plain"] == 2, label  # greedy: constrained speculative = constrained plain
        assert 0 <= s["forced_share"] <= 1 and s["schema_valid_runs"] <= 2
        assert sum(s["finish_reasons"].values()) == 2
    assert summaries["grammar@2"]["forced_tokens"] > 0 and summaries["grammar@2"]["forced_acceptance"] == 1.0
    assert summaries["model@2"]["forced_tokens"] == 0 and summaries["plain"]["forced_share"] == 0
