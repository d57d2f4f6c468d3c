"""lm-evaluation-harness against the HTTP API, every score checked against transformers.

    python -m tools.lm_eval_parity --lm-eval .venv-lmeval/bin/lm_eval   (make test-lm-eval)

Starts `nemotron-serve` with the embedded model's fp32 engine on free loopback ports, runs
lm-eval's `local-completions` model (unmodified, from its own environment, with its remote
tokenizer reading our /tokenize and /tokenizer_info) on the repository's local multiple-choice
task `eval/tasks/nemotron_mc`, then computes every (question, choice) log-likelihood with
transformers on the same weights (the embedded GGUF) and compares them item by item. Exits 1
when any differs by 1e-3 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from engine_build.embedded import default_cache_dir, ensure_embedded_checkpoint, fetch_gguf
from service.runtime.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
TASK = "nemotron_mc"
TOLERANCE = 1e-3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(cache_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """nemotron-serve on loopback with the fp32 engine; returns once /v1/health/ready is 200."""
    http_port = _free_port()
    exe = shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"
    command = [exe, "--host", "127.0.0.1", "--port", str(_free_port()), "--metrics-port", "0"]
    command += ["--http-port", str(http_port), "--precision", "fp32"]
    command += ["--cache-dir", str(cache_dir), "--log-format", "json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"nemotron-serve exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/v1/health/ready", timeout=5) as reply:
                if reply.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"nemotron-serve was not ready in 1200 s; see {log}")


def run_lm_eval(lm_eval: str, url: str, model: str, out: Path) -> Path:
    """Run the task through local-completions; the samples file it writes."""
    model_args = ",".join(
        (
            f"base_url={url}/v1/completions",
            f"model={model}",
            "tokenizer_backend=remote",
            "num_concurrent=1",
            "max_retries=1",
        )
    )
    command = [lm_eval, "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", TASK, "--include_path", "eval/tasks", "--log_samples"]
    command += ["--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    return samples


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Context and continuation ids as lm-eval encodes them (trailing spaces move across)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    return tokenizer.encode(context), tokenizer.encode(continuation)


@torch.inference_mode()
def reference_loglikelihoods(
    gguf: Path, tokenizer: TextTokenizer, pairs: list[tuple[str, str]]
) -> list[float]:
    """Each continuation's log-likelihood after its context, by transformers (fp32)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    scores = []
    for context, continuation in pairs:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        ids = context_ids + continuation_ids
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        rows = torch.arange(len(context_ids) - 1, len(ids) - 1)
        scores.append(float(logprobs[rows, torch.tensor(continuation_ids)].sum()))
    return scores


def main() -> int:
    """Run lm-eval, compare, print the table; 0 when every score agrees."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable (own venv)")
    args = parser.parse_args()
    cache = default_cache_dir(os.environ)
    work = Path(tempfile.mkdtemp(prefix="lm-eval-parity-"))
    server, url = start_server(cache, work / "server.log")
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as reply:
            model = json.load(reply)["data"][0]["id"]
        samples = run_lm_eval(args.lm_eval, url, model, work / "out")
        with urllib.request.urlopen(f"{url}/v1/metadata", timeout=30) as reply:
            engine = json.load(reply)["engine"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    # arguments: {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}, choice order
    pairs = [
        (a["arg_0"], a["arg_1"])
        for doc in docs
        for _, a in sorted(doc["arguments"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
    ]
    served = [float(resp[0]) for doc in docs for resp in doc["filtered_resps"]]
    tokenizer = TextTokenizer(ensure_embedded_checkpoint(cache))  # the served model's
    reference = reference_loglikelihoods(fetch_gguf(cache), tokenizer, pairs)
    worst = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    correct = sum(doc["acc"] for doc in docs)
    print(f"\nengine: {engine['engine_name']} ({engine['precision']}); task {TASK}:")
    print(f"{len(docs)} questions, {len(pairs)} scored choices; acc {correct}/{len(docs)}")
    print("\n| question | choice | lm-eval via HTTP | transformers | abs diff |")
    print("|---|---|---|---|---|")
    for (context, continuation), ours, theirs in zip(pairs, served, reference, strict=True):
        question = context.split("\n")[0].removeprefix("Question: ")
        print(f"| {question} | {continuation.strip()} | {ours:.5f} | {theirs:.5f} | "
              f"{abs(ours - theirs):.2e} |")  # fmt: skip
    print(f"\nlargest difference: {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
