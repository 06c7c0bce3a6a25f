"""Generation with live retrieval: each completed 64-token chunk of prompt and answer queries
the work directory's faiss index, and the neighbours found feed the next chunk.

Takes a finished work directory (a database and a pretrain or sft checkpoint), e.g. the
one examples/python_api.py leaves, and generates three ways:
  1. the command line:   retro-run generate --workdir W --live-retrieval --prompt ...
  2. the Session API:    load_session(workdir=W).generate(..., live_retrieval=True)
  3. one level lower, with LiveRetrieval's log of which database chunks each chunk retrieved.
With --nemo the model comes from a package and only the database from the work directory.

    python examples/python_api.py --workdir /tmp/retro_api
    python examples/generate_live_retrieval.py --workdir /tmp/retro_api --prompt "The with statement"
    python examples/generate_live_retrieval.py --workdir /tmp/retro_api --nemo /tmp/retro_api/export/smoke.nemo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from retro_toolkit.collections.generate import LiveRetrieval, SamplingParams, generate_text
from retro_toolkit.collections.generate.session import Session, load_session


def generate_with_cli(workdir: Path, nemo: Path | None, prompt: str, new_tokens: int, temperature: float) -> str:
    cmd = [sys.executable, "-m", "retro_toolkit", "generate", "--workdir", str(workdir), "--live-retrieval",
           "--prompt", prompt, "--max-new-tokens", str(new_tokens), "--temperature", str(temperature)]
    if nemo is not None:
        cmd += ["--nemo", str(nemo)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def show_retrieval(session: Session, prompt: str, params: SamplingParams) -> None:
    """Generate through a LiveRetrieval source we keep, then print what each chunk retrieved."""
    retriever = session.retriever()  # the work directory's Retriever, checked against the model
    live = LiveRetrieval(retriever, k=session.model.config.num_neighbors)
    out = generate_text(session.model, session.tokenizer, [prompt], params, live)[0]
    print(f"generated ({out.finish_reason}, {len(out.tokens)} tokens, {live.queries} chunk(s) looked up)")
    for chunk_index, ids in live.log:
        for rank, chunk_id in enumerate(ids[0].tolist()):
            text = retriever.chunk_text(chunk_id)[:70] if chunk_id >= 0 else "(none)"
            print(f"  chunk {chunk_index} neighbour {rank}: db chunk {chunk_id}: {text!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="a finished work directory (database + checkpoint)")
    p.add_argument("--nemo", type=Path, help="take the model from this .nemo package instead of the checkpoints")
    p.add_argument("--prompt", default="The with statement", help="the text to continue")
    # Retrieval starts once a chunk is complete: prompt + new tokens must reach one chunk (64).
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    a = p.parse_args()
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature)

    print("== retro-run generate --live-retrieval")
    print(repr(generate_with_cli(a.workdir, a.nemo, a.prompt, a.max_new_tokens, a.temperature).rstrip("\n")))

    print("== Session API")
    session = load_session(workdir=a.workdir, nemo=a.nemo)  # without --nemo: sft, else pretrain checkpoint
    out = session.generate([a.prompt], params, live_retrieval=True)[0]
    print(f"{out.text!r} ({out.finish_reason})")

    print("== LiveRetrieval, with its log")
    show_retrieval(session, a.prompt, params)


if __name__ == "__main__":
    main()
