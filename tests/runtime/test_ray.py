"""Scale-out on Ray, on this one node: `runtime.serve --ray` (Ray Serve, batching by
@serve.batch) with the openai client, the deployment in Ray Serve's local testing mode, and
`runtime.batch --ray` (Ray Data). Slow: each starts Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from runtime.batch import main as batch_main
from runtime.infer import main as infer_main
from tests.helpers import SUBPROCESS_TIMEOUT_S, run_main
from tests.runtime.serving import serve_process

pytestmark = pytest.mark.slow
TOKENS = 10


def infer_records(capsys, bundle, audio_files) -> dict[str, dict]:
    result = run_main(infer_main, bundle, "--audio", *audio_files, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys)
    return {record["file"]: record for record in map(json.loads, result.stdout.splitlines())}


def test_ray_serve_answers_the_openai_client_as_runtime_infer_does(serve_bundles, audio_files, capsys):
    expected = infer_records(capsys, serve_bundles["lalm"], audio_files[:1])[str(audio_files[0])]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    args = (serve_bundles["lalm"], serve_bundles["wav2vec2"], "--ray", "--max-new-tokens", TOKENS)
    try:
        with serve_process(*args, env=env, stdout=subprocess.DEVNULL) as (url, process):
            check_ray_server(url, process, audio_files, expected)
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def check_ray_server(url: str, process: subprocess.Popen, audio_files, expected: dict) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with open(audio_files[0], "rb") as handle:
        assert client.audio.transcriptions.create(model="lalm", file=handle).text == expected["text"]
    with open(audio_files[0], "rb") as handle:
        events = list(client.audio.transcriptions.create(model="lalm", file=handle, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected["text"]

    def features(_):
        with open(audio_files[0], "rb") as handle:
            return httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": handle}, timeout=SUBPROCESS_TIMEOUT_S).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(features, range(8))) == [200] * 8
    metrics = httpx.get(f"{url}/metrics").text.splitlines()
    batches = next(line for line in metrics if line.startswith('lalm_batch_size_count{model="wav2vec2"}'))
    assert float(batches.split()[-1]) < 8  # @serve.batch put clips together
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=SUBPROCESS_TIMEOUT_S) == 0


def test_deployment_in_ray_serve_local_testing_mode(serve_bundles, audio_files, capsys):
    from ray import serve

    from runtime.server.engine import ServeSettings
    from runtime.server.ray_serve import deployment
    from runtime.sessions import SessionOptions

    expected = infer_records(capsys, serve_bundles["lalm"], audio_files[:1])[str(audio_files[0])]
    app = deployment([serve_bundles["lalm"]], None, ServeSettings(max_new_tokens=TOKENS), SessionOptions(provider="cpu"))
    handle = serve.run(app, _local_testing_mode=True)
    result = handle.transcribe.remote("lalm", audio_files[0].read_bytes()).result()
    assert (result["text"], result["tokens"]) == (expected["text"], expected["tokens"])


def test_batch_on_ray_data_equals_runtime_infer_and_resumes(serve_bundles, audio_files, tmp_path, capsys):
    expected = infer_records(capsys, serve_bundles["lalm"], audio_files)
    output = tmp_path / "t.jsonl"
    output.write_text(json.dumps({"file": str(audio_files[0]), **{k: expected[str(audio_files[0])][k] for k in ("text", "tokens")}}) + "\n")
    args = ["--input", *audio_files, "--output", output, "--max-new-tokens", TOKENS, "--ray", "--batch-size", 2, "--actors", 2, "-q"]
    try:
        result = run_main(batch_main, serve_bundles["lalm"], *args, capsys=capsys)
    finally:
        import ray

        ray.shutdown()  # the run started Ray in this process
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(map(str, audio_files))  # the first was skipped, none twice
    for record in records:
        assert (record["text"], record["tokens"]) == (expected[record["file"]]["text"], expected[record["file"]]["tokens"])
