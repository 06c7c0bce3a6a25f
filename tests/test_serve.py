"""retro-run serve: the tuned smoke package behind a real server on a free loopback port,
queried with a real HTTP client (httpx) and, where it is installed, the openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import retro_run

pytestmark = pytest.mark.slow
PROMPT = "The with statement"
CONTEXT = "with open(f) as g: pass"


def start(workdir, log_dir, *args: str) -> tuple[subprocess.Popen, str]:
    """`retro-run serve` on a free loopback port: the process and its URL."""
    log = open(log_dir / "server.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "retro_toolkit", "serve", "--nemo", str(workdir / "export" / "smoke.nemo"),
                          "--workdir", str(workdir), "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = p.stdout.readline()
    assert line.startswith("serving smoke on http://127.0.0.1:"), (line, open(log.name).read()[-2000:])
    return p, line.split(" on ")[1].strip()


def stop(p: subprocess.Popen) -> None:
    p.terminate()  # uvicorn shuts down gracefully, then lets the signal end the process
    assert p.wait(30) in (0, -15)


@pytest.fixture(scope="module")
def server(tuned, tmp_path_factory):
    p, url = start(tuned, tmp_path_factory.mktemp("serve"), "--live-retrieval", "--max-wait-ms", "50",
                   "--max-length", "512")
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, tuned
    stop(p)


def generate_cli(tuned, *args: str) -> str:
    p = retro_run("generate", "--nemo", str(tuned / "export" / "smoke.nemo"), "--workdir", str(tuned), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout[:-1]  # the text and a newline


def events(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_greedy_completions_and_chat_equal_retro_run_generate(server):
    client, tuned = server
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                             "contexts": [CONTEXT]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "smoke"
    assert body["choices"][0]["text"] == generate_cli(tuned, "--prompt", PROMPT, "--max-new-tokens", "12",
                                                      "--context", CONTEXT)
    assert body["usage"]["completion_tokens"] <= 12 and body["choices"][0]["finish_reason"] in ("stop", "length")
    live = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 70, "temperature": 0})
    assert live.json()["choices"][0]["text"] == generate_cli(tuned, "--live-retrieval", "--prompt", PROMPT,
                                                             "--max-new-tokens", "70")
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "What does pass do?"}],
                                                     "max_tokens": 10, "temperature": 0, "contexts": [CONTEXT]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == generate_cli(
        tuned, "--chat", "--prompt", "What does pass do?", "--max-new-tokens", "10", "--context", CONTEXT)


def test_streamed_pieces_add_up_to_the_answer(server):
    client, _ = server
    ask = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "contexts": [CONTEXT]}
    whole = client.post("/v1/completions", json=ask).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**ask, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]" and got[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert "".join(e["choices"][0]["text"] for e in got[:-1]) == whole["text"]
    chat = {"messages": [{"role": "user", "content": "What does pass do?"}], "max_tokens": 10, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        got = events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in got[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1]) == answer


def test_retrieve_and_the_chunk_ids_live_retrieval_used(server):
    from retro_toolkit.collections.retrieval.retriever import Retriever
    from retro_toolkit.collections.text.tokenizer import workdir_tokenizer

    client, tuned = server
    r = client.post("/v1/retrieve", json={"query": ["open a file", "define a class"], "k": 3})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    retriever = Retriever(tuned)
    want = retriever.search(["open a file", "define a class"], k=3)
    assert [[n["chunk_id"] for n in q["neighbours"]] for q in data] == want.ids.tolist()
    assert data[0]["neighbours"][0]["text"] == retriever.chunk_text(int(want.ids[0, 0]))
    # A prompt of more than one chunk: its first chunk is looked up before the answer starts.
    tok = workdir_tokenizer(tuned)
    prompt = tok.decode(tok.encode([open(tuned / "recipe.resolved.yaml").read()])[0][:70])
    first = tok.encode([prompt])[0][:64]
    out = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                               "return_retrieved": True}).json()["choices"][0]
    assert out["retrieved_chunk_ids"][0] == retriever.search([first], k=2).ids[0].tolist()


def test_concurrent_requests_share_batches_and_answer_as_alone(server):
    client, _ = server
    prompts = [f"{PROMPT} number {i}" for i in range(6)]
    alone = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0,
                                                   "contexts": [CONTEXT]}).json()["choices"][0]["text"]
             for p in prompts]
    before = client.get("/health").json()["largest_batch"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                                                 "contexts": [CONTEXT]})
        results[i] = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone
    assert before <= 1 and client.get("/health").json()["largest_batch"] > 1


def test_ignore_eos_runs_every_choice_to_max_tokens(server):
    """(This model does not end these answers early either; benchmarks/speed/serve.py's smoke
    package, which ends them at once, shows the difference: 0 tokens without, 32 with.)"""
    client, _ = server
    ask = {"prompt": "Explain the pass statement.", "max_tokens": 9, "temperature": 0, "n": 2, "ignore_eos": True}
    full = client.post("/v1/completions", json=ask).json()
    assert full["usage"]["completion_tokens"] == 18 and all(c["finish_reason"] == "length" for c in full["choices"])
    assert full["choices"][0]["text"] == full["choices"][1]["text"]  # greedy: n copies of one answer


def test_a_client_that_goes_away_frees_its_row(server):
    client, _ = server
    cancelled = client.get("/health").json()["rows_cancelled"]
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 180, "temperature": 0,
                                                        "stream": True}) as r:
        next(r.iter_lines())  # the first piece; then the client hangs up
    deadline = time.monotonic() + 30
    while client.get("/health").json()["rows_cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/health").json()["rows_cancelled"] == cancelled + 1


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 512}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "return_retrieved": True, "contexts": ["c"]}, 400, "return_retrieved"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/retrieve", {"query": "x", "k": 0}, 400, "k"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
])
def test_bad_requests_get_4xx_naming_the_field_and_the_server_goes_on(server, path, body, status, param):
    client, _ = server
    r = (client.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
         else client.post(path, json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param:
        assert param.split(".")[0] in error["message"]
    ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_talks_to_it(server):
    openai = pytest.importorskip("openai")
    client, tuned = server
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
    text = oa.completions.create(model="smoke", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert text == client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12,
                                                        "temperature": 0}).json()["choices"][0]["text"]
    pieces = oa.chat.completions.create(model="smoke", messages=[{"role": "user", "content": "What does pass do?"}],
                                        max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert streamed == client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What does pass do?"}], "max_tokens": 10,
        "temperature": 0}).json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("args, message", [
    (["--nemo", "m.nemo", "--live-retrieval"], "--live-retrieval retrieves from a work directory's database: give --workdir too."),
    (["--nemo", "m.nemo", "--port", "70000"], "--port must be 0..65535, not 70000."),
    (["--nemo", "m.nemo", "--max-batch", "0"], "--max-batch must be at least 1, not 0."),
    (["--nemo", "m.nemo", "--max-wait-ms", "-1"], "--max-wait-ms must be 0 or more, not -1.0."),
])
def test_bad_serve_arguments_exit_2_before_loading_anything(args, message):
    p = retro_run("serve", *args)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {message}", p.stderr
