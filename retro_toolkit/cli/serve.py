"""`retro-run serve (--nemo | --checkpoint | --workdir) [--live-retrieval] [--host --port]`: a
trained model behind OpenAI-style HTTP endpoints."""

from __future__ import annotations

import argparse

NAME = "serve"
EPILOG = """\
The model is loaded as `retro-run generate` loads it. Endpoints (retro_toolkit/serve/app.py):
  POST /v1/completions, /v1/chat/completions   OpenAI's fields; "stream": true for server-sent events
  POST /v1/retrieve                            the database's neighbours of a query (needs a work directory)
  GET  /health, /v1/models
Concurrent requests with the same sampling settings share batches of up to --max-batch rows,
gathered for at most --max-wait-ms. With --live-retrieval, a request without "contexts"
retrieves from the work directory's index at every chunk; "return_retrieved": true lists the
chunk ids each choice retrieved. Port 0 picks a free port; the first line printed says which.

examples:
  retro-run serve --nemo runs/smoke/export/smoke.nemo --workdir runs/smoke --live-retrieval --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The with statement", "max_tokens": 32, "temperature": 0}'
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(NAME, help="serve a trained model over HTTP (OpenAI-style completions and chat)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--nemo", help="a .nemo package (retro-run RECIPE --stages export writes one)")
    g.add_argument("--checkpoint", help="checkpoints/<stage> or iter_NNNNNNN folder")
    g.add_argument("--workdir", help="work directory: its database answers /v1/retrieve and live retrieval")
    g.add_argument("--live-retrieval", action="store_true",
                   help="requests without contexts retrieve from the work directory's index at every chunk")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    g.add_argument("--name", help="the model name clients send (default: the package's or checkpoint's name)")
    g.add_argument("--max-length", type=int,
                   help="positions a request may use, prompt + max_tokens (default: the model's seq_length; a "
                        "rotary model may go further than it was trained on, a learned-position one may not)")
    g.add_argument("--max-batch", type=int, default=8, help="rows generated together at most (default 8)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests before it starts (default 5)")
    return g


def run(args: argparse.Namespace) -> int:
    import socket
    from pathlib import Path

    from retro_toolkit.errors import UserError

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, not {args.max_batch}.")
    if args.max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must be 0 or more, not {args.max_wait_ms}.")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0..65535, not {args.port}.")
    if args.live_retrieval and not args.workdir:
        raise UserError("--live-retrieval retrieves from a work directory's database: give --workdir too.")
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    import uvicorn

    from retro_toolkit.collections.generate.session import load_session
    from retro_toolkit.serve.app import make_app
    from retro_toolkit.serve.engine import Engine

    session = load_session(args.checkpoint, args.workdir, args.nemo)
    if args.live_retrieval:
        session.retriever()  # a database that does not fit the model is refused now, not at the first request
    trained = int(session.model.max_sequence_length)
    max_length = args.max_length or trained
    if max_length < 1 or (max_length > trained and session.model.position_embedding_type == "learned_absolute"):
        raise UserError(f"--max-length {max_length}: the model has learned positions for {trained} tokens; give "
                        f"1..{trained}.")
    name = args.name or Path(args.nemo or session.checkpoint).stem
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): choose another --port "
                        "(0 picks a free one).") from None
    engine = Engine(session, args.max_batch, args.max_wait_ms / 1000)
    app = make_app(session, engine, name, args.live_retrieval, max_length)
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
