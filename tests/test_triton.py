"""`spectrt triton-repo` on a real Triton Inference Server.

The server is Triton 2.51 (CPU) from the nvidia-pytriton==0.7.0 wheel, set up once by
scripts/triton_env.sh in its own venv (~/.cache/spectrt/triton-venv; the wheel pins numpy<2, and
so must the Python that Triton's stub embeds). The repository for the tiny bundle runs 2 instances;
the model's stub environment is given by --python-env (Triton's EXECUTION_ENV_PATH), not by the
server's PATH. Clients: tritonclient's gRPC streaming client (in that venv, as a child process:
its grpcio/protobuf/numpy<2 stay out of the test's interpreter) and Triton's HTTP
generate_stream endpoint (plain urllib). Expected outputs come from `Generator(tiny_bundle)` here.

The writer's own checks (config, overwrite safety, request parsing) are fast and not marked slow.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spectrt.errors import ConfigError, SpectrtError
from spectrt.serve.triton import TritonRepoConfig, render_config, triton_repo_command, write_triton_repository
from spectrt.serve.triton_model import RequestError, parse_request

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"


# --- the writer and the request mapping (fast) ---------------------------------------------------------

def test_config_has_the_protocol_and_the_options(tiny_bundle, tmp_path):
    model_dir = write_triton_repository(tiny_bundle, tmp_path / "repo", TritonRepoConfig(
        name=MODEL, instances=3, max_queue=16, max_queue_delay_ms=250, python_env="/opt/env"))
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    assert "model_transaction_policy { decoupled: true }" in config
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in config
    for name, dtype in (("prompt", "TYPE_STRING"), ("prompt_ids", "TYPE_INT64"), ("max_tokens", "TYPE_INT32"),
                        ("temperature", "TYPE_FP32"), ("top_p", "TYPE_FP32"), ("top_k", "TYPE_INT64"),
                        ("seed", "TYPE_INT64"), ("stop", "TYPE_STRING"), ("draft", "TYPE_STRING"),
                        ("width", "TYPE_STRING"), ("text", "TYPE_STRING"), ("token_ids", "TYPE_INT64"),
                        ("finish_reason", "TYPE_STRING"), ("metrics", "TYPE_STRING")):
        assert f'name: "{name}" data_type: {dtype}' in config, name
    assert f'key: "spectrt_bundle" value: {{ string_value: "{Path(tiny_bundle).resolve()}" }}' in config
    assert 'key: "EXECUTION_ENV_PATH" value: { string_value: "/opt/env" }' in config
    assert "max_queue_size: 16" in config and "default_timeout_microseconds: 250000" in config
    assert (model_dir / "1" / "model.py").read_bytes() == (ROOT / "spectrt/serve/triton_model.py").read_bytes()
    gpu = render_config("m", "/b", TritonRepoConfig(kind="gpu", instances=2))
    assert "instance_group [ { count: 2 kind: KIND_GPU } ]" in gpu and "dynamic_batching" not in gpu


def test_copy_bundle_makes_the_repository_self_contained(tiny_bundle, tmp_path):
    model_dir = write_triton_repository(tiny_bundle, tmp_path / "repo", TritonRepoConfig(name=MODEL, copy_bundle=True))
    assert 'key: "spectrt_bundle" value: { string_value: "bundle" }' in (model_dir / "config.pbtxt").read_text()
    copied = sorted(p.relative_to(model_dir / "1" / "bundle") for p in (model_dir / "1" / "bundle").rglob("*"))
    assert copied == sorted(p.relative_to(tiny_bundle) for p in Path(tiny_bundle).rglob("*"))


def test_writer_refuses_what_it_did_not_write_and_overwrites_only_on_request(tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    with pytest.raises(ConfigError, match="not written by `spectrt triton-repo`"):
        write_triton_repository(tiny_bundle, repo, TritonRepoConfig(name="other", overwrite=True))
    assert (repo / "other" / "config.pbtxt").read_text() == 'backend: "onnxruntime"\n'
    write_triton_repository(tiny_bundle, repo, TritonRepoConfig(name=MODEL))
    with pytest.raises(ConfigError, match="--overwrite"):
        write_triton_repository(tiny_bundle, repo, TritonRepoConfig(name=MODEL, instances=2))
    write_triton_repository(tiny_bundle, repo, TritonRepoConfig(name=MODEL, instances=2, overwrite=True))
    assert "count: 2" in (repo / MODEL / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["other", MODEL]  # no staging folders left
    with pytest.raises(SpectrtError, match="not a spectrt bundle"):
        write_triton_repository(tmp_path, tmp_path / "repo2")
    for bad in (dict(instances=0), dict(name="a/b"), dict(kind="tpu"), dict(bundle_path="rel/path"),
                dict(copy_bundle=True, bundle_path="/x")):
        with pytest.raises(ConfigError):
            TritonRepoConfig(**bad)


def test_cli_command(tiny_bundle, tmp_path):
    result = CliRunner().invoke(triton_repo_command, [str(tiny_bundle), str(tmp_path / "repo"), "--name", MODEL,
                                                      "--instances", "2", "--max-queue", "4"])
    assert result.exit_code == 0, result.output
    assert "count: 2" in (tmp_path / "repo" / MODEL / "config.pbtxt").read_text()
    result = CliRunner().invoke(triton_repo_command, [str(tiny_bundle), str(tmp_path / "repo"), "--name", MODEL])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)


def test_parse_request_maps_inputs_onto_generate_options():
    def text(*values):
        return np.array([v.encode() for v in values], dtype=object)

    kwargs = parse_request({"prompt": text("hi"), "max_tokens": np.array([7], np.int32),
                            "temperature": np.array([0.5], np.float32), "top_p": np.array([0.9], np.float32),
                            "top_k": np.array([5]), "seed": np.array([3]), "stop": text("a", "\n\n"),
                            "draft": text("ngram"), "width": text("2"), "accept": text("rejection"),
                            "prediction": text("def f():\n    return 1\n")})
    assert kwargs == {"prompt": "hi", "max_new_tokens": 7, "temperature": 0.5, "top_p": pytest.approx(0.9),
                      "top_k": 5, "seed": 3, "stop": ("a", "\n\n"), "draft": "ngram", "width": "2",
                      "accept": "rejection", "prediction": "def f():\n    return 1\n"}
    assert all(type(kwargs[k]) is int for k in ("max_new_tokens", "top_k", "seed"))
    assert parse_request({"prompt_ids": np.array([1, 2, 3])}) == {"prompt_ids": [1, 2, 3]}
    messages = [{"role": "user", "content": "hi"}]
    assert parse_request({"messages": text(json.dumps(messages))}) == {"messages": messages}
    for bad, message in (({}, "send one of the inputs"), ({"prompt": text("a", "b")}, "one text element"),
                         ({"prompt": np.array([b"\xff"], dtype=object)}, "UTF-8"),
                         ({"prompt": text("a"), "seed": np.array([1, 2])}, "exactly one element"),
                         ({"messages": text("{not json")}, "not valid JSON")):
        with pytest.raises(RequestError, match=message):
            parse_request(bad)


# --- the model in this process, under a stand-in for Triton's Python backend (fast) ------------------

def stand_in_backend() -> types.ModuleType:
    """Just enough of `triton_python_backend_utils` to run TritonPythonModel here; metric values are kept in
    `backend.metric_values[(family name, sorted labels)]`."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.metric_values = {}

    class TritonModelException(Exception):
        pass

    class TritonError:
        def __init__(self, message: str):
            self.message = message

    class Tensor:
        def __init__(self, name: str, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {tensor.name: tensor.array for tensor in output_tensors}
            self.error = error

    class Logger:
        log_info = log_warn = log_error = log_verbose = staticmethod(lambda message: None)

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name: str, description: str, kind: str):
            family = self

            class Metric:
                def __init__(self, labels: dict[str, str], buckets=None):
                    self.key = (family.name, tuple(sorted(labels.items())))
                    pb.metric_values.setdefault(self.key, 0.0)

                def increment(self, value: float) -> None:
                    pb.metric_values[self.key] += value

                def set(self, value: float) -> None:
                    pb.metric_values[self.key] = value

                def observe(self, value: float) -> None:
                    pb.metric_values[self.key] += 1  # the count of observations

            self.name, self.Metric = name, Metric

    pb.TritonModelException, pb.TritonError, pb.Tensor = TritonModelException, TritonError, Tensor
    pb.InferenceResponse, pb.Logger, pb.MetricFamily = InferenceResponse, Logger, MetricFamily
    pb.using_decoupled_model_transaction_policy = lambda config: config["model_transaction_policy"]["decoupled"]
    pb.triton_string_to_numpy = lambda dtype: {"TYPE_STRING": np.object_, "TYPE_INT64": np.int64}[dtype]
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return pb


class StandInRequest:
    """One request: its inputs (name -> Tensor) and its own response sender, which keeps what it is sent."""

    def __init__(self, pb, **inputs):
        self.inputs = {name: pb.Tensor(name, np.array([value.encode()] if isinstance(value, str) else [value],
                                                      dtype=object if isinstance(value, str) else np.int32))
                       for name, value in inputs.items()}
        self.responses = []  # (response or None, flags)

    def get_response_sender(self):
        return self

    def send(self, response=None, flags: int = 0) -> None:
        self.responses.append((response, flags))

    def is_cancelled(self) -> bool:
        return False


@pytest.fixture()
def stand_in_model(tiny_bundle, monkeypatch):
    """(TritonPythonModel initialised on the tiny bundle, its stand-in backend)."""
    from spectrt.serve.triton import OUTPUTS
    from spectrt.serve.triton_model import TritonPythonModel

    pb = stand_in_backend()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    config = {"model_transaction_policy": {"decoupled": True}, "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
              "parameters": {"spectrt_bundle": {"string_value": str(tiny_bundle)},
                             "spectrt_threads": {"string_value": "1"},
                             "spectrt_allow_numpy2": {"string_value": "true"}},  # no stub here: nothing misreads
              "output": [{"name": name, "data_type": dtype} for name, dtype, _ in OUTPUTS]}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": MODEL, "model_repository": str(tiny_bundle),
                      "model_version": "1", "model_instance_name": f"{MODEL}_0_0", "model_instance_kind": "CPU"})
    yield model, pb
    model.finalize()


def test_requests_are_labelled_by_the_drafter_they_run_with(stand_in_model):
    model, pb = stand_in_model
    drafts = {"auto": "model", "model": "model", "ngram": "ngram", "none": "none", "head": "head",
              "grammar": "grammar", "grammar+ngram": "grammar+ngram", "grammar+model": "grammar+model",
              "medusa": "unknown"}  # a misspelt drafter is refused; its label stays one of a known few
    requests = [StandInRequest(pb, prompt="hi", max_tokens=3, draft=draft) for draft in drafts]
    model.execute(requests)
    for (draft, label), request in zip(drafts.items(), requests):
        final, flags = request.responses[-1]
        assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL, draft
        # the tiny bundle has no head, and the Triton model takes no constraint: those three are refused
        reason = "length" if draft in ("auto", "model", "ngram", "none") else "invalid"
        assert (final.error is None) == (reason == "length"), (draft, final.error and final.error.message)
        key = ("spectrt_requests_total", tuple(sorted({"model": MODEL, "drafter": label,
                                                        "finish_reason": reason}.items())))
        assert pb.metric_values.get(key, 0) >= 1, (draft, sorted(pb.metric_values))
    # a constrained request runs `auto` as grammar + the bundle's drafter, as the Generator resolves it
    assert model._drafter({"prompt": "hi", "regex": "[0-9]+"}) == "grammar+model"
    assert model._drafter({"prompt": "hi", "draft": "ngram", "choice": ("a", "b")}) == "ngram"


def test_finalize_closes_the_generator(stand_in_model):
    from spectrt.runtime.errors import GenerationError

    model, pb = stand_in_model
    generator = model.generator
    closes = []
    close = generator.close
    generator.close = lambda: (closes.append(1), close())[1]
    request = StandInRequest(pb, prompt="hi", max_tokens=3)
    model.execute([request])
    assert request.responses[-1][0].error is None
    model.finalize()
    assert closes == [1]
    with pytest.raises(GenerationError, match="closed"):  # the backends were freed
        generator.generate("hi", max_new_tokens=2)
    model.finalize()  # Triton may call it again: nothing left to close
    assert closes == [1]


# --- a real Triton Inference Server (slow: installs the wheel once, ~30 s) ----------------------------

CLIENT = r'''
"""Runs requests against Triton with tritonclient's gRPC streaming client; JSON in (stdin), JSON out."""
import json, queue, sys, threading, time
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

DTYPES = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
spec = json.load(sys.stdin)

def as_input(name, value):
    dtype, data = value
    array = np.array([v.encode() for v in data] if dtype == "BYTES" else data, dtype=DTYPES[dtype])
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor

def collect(responses, request_id, limit=None):
    """Responses of one request until its final one (or an error, or `limit` responses)."""
    out = {"id": request_id, "responses": [], "error": None}
    while limit is None or len(out["responses"]) < limit:
        result, error = responses.get(timeout=60)
        if error is not None:
            out["error"] = str(error)
            out["end"] = time.monotonic()
            return out
        assert result.get_response().id == request_id, (result.get_response().id, request_id)
        item = {"final": result.get_response().parameters["triton_final_response"].bool_param}
        if result.get_response().outputs:
            item.update(text=result.as_numpy("text")[0].decode(), token_ids=result.as_numpy("token_ids").tolist(),
                        finish_reason=result.as_numpy("finish_reason")[0].decode(),
                        metrics=result.as_numpy("metrics")[0].decode())
        if not out["responses"]:
            out["first"] = time.monotonic()
        out["responses"].append(item)
        if item["final"]:
            out["end"] = time.monotonic()
            return out
    out["end"] = time.monotonic()
    return out

def run(requests, barrier=None):
    """One client and one stream for `requests`, sent one after the other on that stream."""
    client = grpcclient.InferenceServerClient(spec["url"])
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        if barrier is not None:
            barrier.wait()
        results = []
        for number, request in enumerate(requests):
            request_id = f"r{number}"
            start = time.monotonic()
            cancel_after = request.pop("cancel_after", None)
            client.async_stream_infer(spec["model"], [as_input(k, v) for k, v in request.items()],
                                      request_id=request_id, enable_empty_final_response=True)
            results.append({**collect(responses, request_id, cancel_after), "start": start})
            if cancel_after is not None:  # cancel the request (gRPC stream closed with cancellation), new stream
                client.stop_stream(cancel_requests=True)
                responses = queue.Queue()
                client.start_stream(callback=lambda result, error: responses.put((result, error)))
        return results
    finally:
        client.stop_stream()
        client.close()

if spec["mode"] == "sequential":
    print(json.dumps(run(spec["requests"])))
else:  # concurrent: one client (own connection and stream) per request, released together
    barrier = threading.Barrier(len(spec["requests"]))
    results = [None] * len(spec["requests"])
    def worker(i):
        results[i] = run([spec["requests"][i]], barrier)[0]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(spec["requests"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def triton_env() -> dict[str, str]:
    """The server, backend directory, stub environment and client venv (scripts/triton_env.sh)."""
    if sys.version_info < (3, 11):
        pytest.skip("scripts/triton_env.sh reads pyproject.toml with tomllib (Python >= 3.11)")
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "scripts" / "triton_env.sh"), "--print"], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "SPECTRT_PYTHON": sys.executable})
    assert result.returncode == 0, f"scripts/triton_env.sh failed:\n{result.stderr[-4000:]}"
    print(f"\ntriton_env.sh: {time.monotonic() - started:.1f} s")
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


class TritonServer:
    """A tritonserver child process on free loopback ports, serving one repository; log in a file."""

    def __init__(self, env: dict[str, str], repo: Path, workdir: Path):
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log_path = workdir / "tritonserver.log"
        server_env = {**os.environ, "LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"],
                      # the stub's Python comes from the model's EXECUTION_ENV_PATH (--python-env), not from PATH
                      "SPECTRT_CACHE": str(workdir / "spectrt-cache"), "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "wb") as log:
            # cwd: the stub puts its working folder first on sys.path, and a checkout's ./spectrt would shadow
            self.process = subprocess.Popen(
                [env["TRITONSERVER"], "--model-repository", str(repo), "--backend-directory", env["TRITON_BACKENDS"],
                 "--http-address", "127.0.0.1", "--http-port", str(self.http),
                 "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
                 "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics),
                 "--exit-timeout-secs", "5"],
                cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = 60) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"tritonserver exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        pytest.fail(f"tritonserver not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and its stub processes
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_server(triton_env: dict[str, str], bundle: Path, workdir: Path, *options: str) -> TritonServer:
    """A model repository for `bundle` (`spectrt triton-repo ... options`) served by a ready tritonserver."""
    result = CliRunner().invoke(triton_repo_command, [str(bundle), str(workdir / "repo"), "--name", MODEL, *options,
                                                      "--python-env", triton_env["TRITON_STUB_ENV"]])
    assert result.exit_code == 0, result.output
    server = TritonServer(triton_env, workdir / "repo", workdir)
    try:
        print(f"tritonserver ready in {server.wait_ready():.1f} s")
    except BaseException:
        server.stop()
        raise
    server.env, server.workdir = triton_env, workdir
    return server


@pytest.fixture(scope="module")
def server(triton_env, tiny_bundle, tmp_path_factory, request):
    failed_before = request.session.testsfailed
    server = start_server(triton_env, tiny_bundle, tmp_path_factory.mktemp("triton"), "--instances", "2",
                          "--threads", "1")
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            print(f"\n--- tritonserver log ({server.log_path}) ---\n{server.log()}")


def run_client(server, requests: list[dict], *, concurrent: bool = False) -> list[dict]:
    spec = {"url": f"127.0.0.1:{server.grpc}", "model": MODEL, "requests": requests,
            "mode": "concurrent" if concurrent else "sequential"}
    result = subprocess.run([server.env["TRITON_PYTHON"], "-c", CLIENT], input=json.dumps(spec), capture_output=True,
                            text=True, timeout=180, cwd=server.workdir)
    assert result.returncode == 0, f"client failed:\n{result.stderr[-4000:]}\n--- server log ---\n{server.log()}"
    return json.loads(result.stdout)


def request(prompt=None, prompt_ids=None, max_tokens=None, **options) -> dict:
    """A request in the client's format: input name -> [Triton dtype, values]."""
    inputs = {}
    if prompt is not None:
        inputs["prompt"] = ["BYTES", [prompt]]
    if prompt_ids is not None:
        inputs["prompt_ids"] = ["INT64", list(prompt_ids)]
    if max_tokens is not None:
        inputs["max_tokens"] = ["INT32", [max_tokens]]
    for name, value in options.items():
        inputs[name] = ["BYTES", [str(value)]]
    return inputs


def check_against_generator(server, generator, got: dict, expected_kwargs: dict, max_tokens: int,
                            **options) -> None:
    expected = generator.generate(**expected_kwargs, max_new_tokens=max_tokens, **options)
    assert got["error"] is None, f"{got['error']}\n--- server log ---\n{server.log()}"
    tokens, final = got["responses"][:-1], got["responses"][-1]
    assert final["final"] and all(not r["final"] for r in tokens)
    assert [t for r in tokens for t in r["token_ids"]] == expected.token_ids
    assert all(len(r["token_ids"]) == 1 and r["finish_reason"] == "" and r["metrics"] == "" for r in tokens)
    assert final["token_ids"] == [] and final["finish_reason"] == expected.finish_reason
    assert "".join(r["text"] for r in got["responses"]) == expected.text
    metrics = json.loads(final["metrics"])
    assert metrics["generated_tokens"] == len(expected.token_ids)
    assert metrics["prompt_tokens"] == len(expected.prompt_token_ids)
    assert {"acceptance_rate", "drafted_tokens", "accepted_tokens", "time_to_first_token"} <= set(metrics)


PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away", "a b a b a b a"]


@pytest.mark.slow
def test_greedy_generations_equal_the_generator(server, tiny_bundle):
    from spectrt.runtime.generator import Generator

    generator = Generator(tiny_bundle, threads=1)
    variants = [{}, {"width": 2}, {"draft": "ngram", "width": 3}, {"draft": "none"}]
    requests = [request(prompt, max_tokens=12 + 7 * i, **variants[i]) for i, prompt in enumerate(PROMPTS)]
    ids = generator.encode("token ids in, token ids out", None)
    requests.append(request(prompt_ids=ids, max_tokens=20, width=5))
    results = run_client(server, requests)
    for i, prompt in enumerate(PROMPTS):
        check_against_generator(server, generator, results[i], {"prompt": prompt}, 12 + 7 * i, **variants[i])
    check_against_generator(server, generator, results[-1], {"prompt_ids": ids}, 20, width=5)
    lengths = [len(r["responses"]) - 1 for r in results]
    print(f"tokens per request: {lengths}")


@pytest.mark.slow
def test_bad_requests_get_spectrt_errors_and_the_instance_keeps_serving(server, tiny_bundle):
    from spectrt.runtime.generator import Generator

    generator = Generator(tiny_bundle, threads=1)
    # 4 instances' worth of bad requests, so that both instances see some, then good ones on the same stream
    bad = [request("hello", max_tokens=5, width=4), request(max_tokens=5),
           request(prompt_ids=[10**6], max_tokens=5), request("hello", max_tokens=5, draft="medusa")] * 2
    good = [request(prompt, max_tokens=10) for prompt in PROMPTS[:2]]
    results = run_client(server, bad + good)
    errors = [r["error"] for r in results[:len(bad)]]
    assert all(r["responses"] == [] for r in results[:len(bad)])
    assert "width 4 was not built into this bundle; built widths: 1, 2, 3, 5" in errors[0]
    assert "send one of the inputs 'prompt'" in errors[1]
    assert "prompt_ids must lie in 0.." in errors[2]
    assert "draft" in errors[3] and "medusa" in errors[3]
    assert errors[:4] == errors[4:]
    for got, prompt in zip(results[len(bad):], PROMPTS):
        check_against_generator(server, generator, got, {"prompt": prompt}, 10)
    assert "Stub process" not in server.log(200_000)  # no instance died or restarted


def metric_total(server, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` on the server's metrics port whose labels include `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                found += float(value)
    return found


@pytest.mark.slow
def test_a_cancelled_stream_frees_its_instance(triton_env, tiny_bundle, tmp_path):
    """One instance: the requests after the cancelled one run on the instance it held, after it was freed and
    counted, so their answers imply the count (no waiting for it)."""
    from spectrt.runtime.generator import Generator

    server = start_server(triton_env, tiny_bundle, tmp_path, "--threads", "1")
    try:
        generator = Generator(tiny_bundle, threads=1)
        long = {**request(PROMPTS[3], max_tokens=120, draft="none"), "cancel_after": 3}
        results = run_client(server, [long] + [request(prompt, max_tokens=30) for prompt in PROMPTS])
        assert len(results[0]["responses"]) == 3 and results[0]["error"] is None
        for got, prompt in zip(results[1:], PROMPTS):
            check_against_generator(server, generator, got, {"prompt": prompt}, 30)
        cancelled = metric_total(server, "spectrt_requests_total", model=MODEL, finish_reason="cancelled")
        assert cancelled == 1, f"the cancelled request was counted {cancelled} times\n{server.log()}"
        assert metric_total(server, "spectrt_requests_total", model=MODEL) == 1 + len(PROMPTS)  # each once
    finally:
        server.stop()


@pytest.mark.slow
def test_concurrent_clients_are_served_by_both_instances(server, tiny_bundle):
    from spectrt.runtime.generator import Generator

    generator = Generator(tiny_bundle, threads=1)
    log = server.log(200_000)
    assert f"{MODEL}_0_0 loaded" in log and f"{MODEL}_0_1 loaded" in log  # two processes, two Generators
    prompts = PROMPTS * 2
    requests = [request(prompt, max_tokens=100, width=1 + i % 3) for i, prompt in enumerate(prompts)]
    results = run_client(server, requests, concurrent=True)
    for got, (i, prompt) in zip(results, enumerate(prompts)):
        check_against_generator(server, generator, got, {"prompt": prompt}, 100, width=1 + i % 3)
    # the two instances worked at the same time: some two requests' streams overlap
    spans = sorted((r["first"], r["end"]) for r in results)
    overlaps = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    print(f"overlapping streams: {overlaps} of {len(spans) - 1}")
    assert overlaps >= 1, spans


@pytest.mark.slow
def test_http_generate_stream_and_metrics(server, tiny_bundle):
    """Triton's HTTP generate_stream extension (server-sent events), and the metrics port."""
    from spectrt.runtime.generator import Generator

    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 16, "stop": ["zz"]}).encode()
    url = f"http://127.0.0.1:{server.http}/v2/models/{MODEL}/generate_stream"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as response:
        events = [json.loads(line[len(b"data: "):]) for line in response.read().splitlines()
                  if line.startswith(b"data: ")]
    expected = Generator(tiny_bundle, threads=1).generate(PROMPTS[0], max_new_tokens=16, stop=("zz",))
    assert "".join(e["text"] for e in events) == expected.text
    assert [e["token_ids"] for e in events[:-1]] == expected.token_ids  # one-element outputs come as scalars
    assert events[-1]["finish_reason"] == expected.finish_reason
    bad = json.dumps({"prompt": "x", "width": "4"}).encode()
    with pytest.raises(urllib.error.HTTPError) as error:  # an error as the first response: HTTP 400
        urllib.request.urlopen(urllib.request.Request(url, data=bad, method="POST"), timeout=60)
    assert error.value.code == 400 and "width 4 was not built" in error.value.read().decode()

    total = functools.partial(metric_total, server)
    assert total("nv_inference_request_success", model=MODEL) >= 1
    # every request this module sent reached an instance, was counted once, by whichever instance ran it
    assert total("spectrt_requests_total", model=MODEL) == total("nv_inference_request_success", model=MODEL)
    assert total("nv_inference_count", model=MODEL) >= 1
    assert total("spectrt_requests_total", model=MODEL, finish_reason="length") >= 1
    assert total("spectrt_requests_total", model=MODEL, drafter="model", finish_reason="invalid") >= 1
    assert total("spectrt_generated_tokens_total", model=MODEL) >= 16
    assert total("spectrt_rounds_total", model=MODEL) >= 1
    assert total("spectrt_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert total("spectrt_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") >= 1
    # each instance checked row-count invariance at load and reports it (1: exact on this machine)
    assert total("spectrt_exact", model=MODEL) >= 1


@pytest.mark.slow
def test_max_queue_rejects_what_does_not_fit(triton_env, tiny_bundle, tmp_path):
    """One instance, one waiting place (--max-queue 1): of 4 simultaneous requests at least one is rejected
    at once by Triton's queue policy (`dynamic_batching` with max_batch_size 0 only queues, never batches)."""
    from spectrt.runtime.generator import Generator

    server = start_server(triton_env, tiny_bundle, tmp_path, "--max-queue", "1")
    try:
        results = run_client(server, [request(PROMPTS[3], max_tokens=120, draft="none")] * 4, concurrent=True)
        rejected = [r for r in results if r["error"] is not None]
        assert rejected and all("Exceeds maximum queue size" in r["error"] for r in rejected), results
        generator = Generator(tiny_bundle, threads=1)
        for got in results:
            if got["error"] is None:
                check_against_generator(server, generator, got, {"prompt": PROMPTS[3]}, 120, draft="none")
        print(f"rejected {len(rejected)} of 4")
    finally:
        server.stop()


def test_a_batched_instance_decodes_its_requests_together(tiny_batched_bundle, monkeypatch):
    """spectrt_max_batch 3: execute hands each request to a worker and returns; the requests' steps share model calls
    and every output is the one the request gets alone."""
    from spectrt.runtime.generator import Generator
    from spectrt.serve.triton import OUTPUTS
    from spectrt.serve.triton_model import TritonPythonModel

    pb = stand_in_backend()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    config = {"model_transaction_policy": {"decoupled": True}, "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
              "parameters": {"spectrt_bundle": {"string_value": str(tiny_batched_bundle)},
                             "spectrt_threads": {"string_value": "1"}, "spectrt_max_batch": {"string_value": "3"},
                             "spectrt_allow_numpy2": {"string_value": "true"}},
              "output": [{"name": name, "data_type": dtype} for name, dtype, _ in OUTPUTS]}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": MODEL,
                      "model_repository": str(tiny_batched_bundle), "model_version": "1",
                      "model_instance_name": f"{MODEL}_0_0", "model_instance_kind": "CPU"})
    requests = [StandInRequest(pb, prompt=prompt, max_tokens=30, draft="ngram" if i % 2 else "none")
                for i, prompt in enumerate(PROMPTS * 2)]
    model.execute(requests)
    generator = model.generator
    model.finalize()  # waits for the workers
    stats = generator.batch_stats()
    solo = Generator(tiny_batched_bundle, threads=1)
    for i, request_ in enumerate(requests):
        tokens = [int(t) for response, _ in request_.responses[:-1] for t in response.outputs["token_ids"]]
        assert request_.responses[-1][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        assert tokens == solo.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=30,
                                       draft="ngram" if i % 2 else "none").token_ids
    assert stats["max_sequences_per_call"] >= 2, stats


@pytest.mark.slow
def test_one_batched_instance_serves_concurrent_clients_together(triton_env, tiny_batched_bundle, tmp_path):
    """`--max-batch 3` on a bundle built with it: one instance runs three requests at once (their streams overlap;
    Triton hands the instance the next request while earlier ones still stream), each exactly as alone."""
    from spectrt.runtime.generator import Generator

    server = start_server(triton_env, tiny_batched_bundle, tmp_path, "--max-batch", "3", "--threads", "1")
    try:
        generator = Generator(tiny_batched_bundle, threads=1)
        variants = [{"draft": "none"}, {"draft": "ngram"}, {"width": 2}]
        requests = [request(prompt, max_tokens=60, **variants[i % 3]) for i, prompt in enumerate(PROMPTS * 2)]
        results = run_client(server, requests, concurrent=True)
        for i, (got, prompt) in enumerate(zip(results, PROMPTS * 2)):
            check_against_generator(server, generator, got, {"prompt": prompt}, 60, **variants[i % 3])
        spans = sorted((r["first"], r["end"]) for r in results)
        overlaps = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
        assert overlaps >= 2, spans  # one instance, several requests at a time
        assert f"{MODEL}_0_0 loaded" in server.log(200_000) and f"{MODEL}_0_1" not in server.log(200_000)
    finally:
        server.stop()


@pytest.mark.slow
def test_model_refuses_a_numpy2_stub_environment(triton_env, tiny_bundle, tmp_path):
    """The test's own venv has NumPy 2, which this Triton's stub misreads: the model must refuse to load
    (with a message that says what to do) rather than serve corrupted prompts."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2 or not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("needs the test's interpreter to be a venv with NumPy 2")
    result = CliRunner().invoke(triton_repo_command, [str(tiny_bundle), str(tmp_path / "repo"), "--name", MODEL,
                                                      "--python-env", sys.prefix])
    assert result.exit_code == 0, result.output
    server = TritonServer(triton_env, tmp_path / "repo", tmp_path)
    try:
        server.process.wait(timeout=60)  # a model that fails to load stops a server started with exit-on-error
    except subprocess.TimeoutExpired:
        pytest.fail(f"tritonserver still running with a NumPy 2 stub:\n{server.log()}")
    finally:
        server.stop()
    assert "reads request tensors wrongly under NumPy 2" in server.log(200_000), server.log()
