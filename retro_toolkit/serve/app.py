"""The HTTP API: OpenAI-style completions and chat completions (streamed as server-sent events
when asked), the database's neighbours of a query, and health.

    POST /v1/completions        {"prompt": "...", "max_tokens": 32, "temperature": 0}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}]}
    POST /v1/retrieve           {"query": "...", "k": 2}       (a server started with --workdir)
    POST /v1/reload             open the work directory's database again now (between batches, a server
                                reopens it by itself when build_db has written a new version)
    GET  /health, GET /v1/models

Every refusal is a 4xx with {"error": {"message", "type", "param"}} naming the field; an error
inside generation fails that request (500) and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from retro_toolkit.collections.generate.generator import before_stop
from retro_toolkit.collections.generate.sampling import SamplingParams
from retro_toolkit.errors import UserError
from retro_toolkit.serve.api import ChatRequest, CompletionRequest, RequestError, RetrieveRequest
from retro_toolkit.serve.engine import Engine, Job


def _validation_error(exc: RequestValidationError) -> RequestError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return RequestError(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])}).")
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return RequestError(f"unknown parameter {param!r}: this server does not take it.", param)
    return RequestError(f"{param}: {err['msg']}" if param else err["msg"], param)


def make_app(session, engine: Engine, name: str, live_retrieval: bool = False,
             max_length: Optional[int] = None) -> FastAPI:
    """The endpoints; a request may use `max_length` positions (default: the model's seq_length)."""
    app = FastAPI(title=f"retro-run serve: {name}", docs_url=None, redoc_url=None)
    limit = int(max_length or session.model.max_sequence_length)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        e = _validation_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        e = RequestError(f"{type(exc).__name__}: {exc}", None, 500, "server_error")
        return JSONResponse(e.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        loaded = session._retriever
        return {"status": "ok", "model": name, "live_retrieval": live_retrieval, "max_batch": engine.max_batch,
                "database": str(session.workdir) if session.workdir else None,
                "database_version": (loaded.version or {}).get("version") if loaded else None,
                "batches_run": engine.batches_run,
                "largest_batch": engine.largest_batch, "rows_cancelled": engine.rows_cancelled}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "retro-toolkit"}]}

    def check(req) -> SamplingParams:
        if req.model not in (None, name):
            raise RequestError(f"model {req.model!r} is not served here; this server serves {name!r}.", "model", 404,
                               "model_not_found")
        if req.return_retrieved and not (live_retrieval and not req.contexts):
            raise RequestError("return_retrieved lists what live retrieval found: start the server with "
                               "--live-retrieval and send no contexts.", "return_retrieved")
        try:
            return SamplingParams(req.max_tokens, req.temperature, req.top_k, req.top_p, req.stops(), req.seed)
        except UserError as e:
            raise RequestError(str(e), "stop") from None

    def neighbours(req, chat: bool) -> Optional[np.ndarray]:
        if live_retrieval and not req.contexts:
            return None
        return session.context_tokens(req.contexts, chat)

    def fits(ids: list[int], req, param: str) -> None:
        if len(ids) + req.max_tokens > limit:
            raise RequestError(f"{param} is {len(ids)} tokens and max_tokens {req.max_tokens}: together they pass "
                               f"the {limit} positions a request may use. Shorten the {param} or lower max_tokens.", param)

    def jobs_for(prompts: list[list[int]], req, params: SamplingParams, nb, loop, events) -> list[Job]:
        n = req.n
        jobs = []
        for p, ids in enumerate(prompts):
            for i in range(n):
                own = params
                if n > 1 and not params.greedy:  # n different samples
                    own = SamplingParams(params.max_new_tokens, params.temperature, params.top_k, params.top_p,
                                         params.stop, params.seed + i)
                jobs.append(Job(p * n + i, ids, own, nb, loop, events, req.ignore_eos))
        for job in jobs:
            engine.submit(job)
        return jobs

    async def collect(request: Request, jobs: list[Job], events: asyncio.Queue) -> dict[int, Any]:
        done: dict[int, Any] = {}
        while len(done) < len(jobs):
            try:
                index, kind, value = await asyncio.wait_for(events.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for job in jobs:
                        job.cancelled.set()
                    return done
                continue
            if kind == "error":
                for job in jobs:
                    job.cancelled.set()
                raise RuntimeError(value)
            if kind == "done":
                done[index] = value
        return done

    async def stream(request: Request, jobs: list[Job], events: asyncio.Queue, chunk) -> AsyncIterator[str]:
        stops = jobs[0].params.stop
        hold = max((len(s) for s in stops), default=1) - 1
        sent = {j.index: "" for j in jobs}
        finished = 0
        try:
            while finished < len(jobs):
                index, kind, value = await events.get()
                job = jobs[index]
                if kind == "error":
                    yield f"data: {json.dumps(RequestError(value, None, 500, 'server_error').body())}\n\n"
                    break
                text = before_stop(session.tokenizer.decode(job.tokens), stops)
                if kind == "token":
                    text = text[: max(len(sent[index]), len(text) - hold)].rstrip("\ufffd")
                if len(text) > len(sent[index]):
                    yield f"data: {json.dumps(chunk(index, text[len(sent[index]):], None))}\n\n"
                    sent[index] = text
                if kind == "done":
                    finished += 1
                    yield f"data: {json.dumps(chunk(index, '', value))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or every choice is done
            for job in jobs:
                job.cancelled.set()

    def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = check(req)
        prompts = [session.prompt_ids(p) for p in req.prompts()]
        for ids in prompts:
            if not ids:
                raise RequestError("a prompt must hold at least one token.", "prompt")
            fits(ids, req, "prompt")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = jobs_for(prompts, req, params, neighbours(req, False), loop, events)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": name}
        if req.stream:
            def chunk(index, text, reason):
                return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}
            return StreamingResponse(stream(request, jobs, events, chunk), media_type="text/event-stream")
        done = await collect(request, jobs, events)
        choices = []
        for job in jobs:
            choice = {"index": job.index, "text": before_stop(session.tokenizer.decode(job.tokens), job.params.stop),
                      "logprobs": None, "finish_reason": done.get(job.index)}
            if req.return_retrieved:
                choice["retrieved_chunk_ids"] = job.retrieved
            choices.append(choice)
        return {**head, "choices": choices, "usage": usage(prompts, jobs)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        params = check(req)
        system = next((m.content for m in req.messages if m.role == "system"), None)
        turns = [(m.role, m.content) for m in req.messages if m.role != "system"]
        if not turns or turns[-1][0] != "user" or any(r != ("user", "assistant")[i % 2] for i, (r, _) in enumerate(turns)):
            raise RequestError("messages must alternate user and assistant turns, starting and ending with a user "
                               "turn (a system message may come first).", "messages")
        ids = session.conversation_ids(turns, req.contexts, system)
        fits(ids, req, "messages")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = jobs_for([ids], req, params, neighbours(req, True), loop, events)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if req.stream:
            def chunk(index, text, reason):
                delta = {"role": "assistant", "content": text} if text else {}
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}
            return StreamingResponse(stream(request, jobs, events, chunk), media_type="text/event-stream")
        done = await collect(request, jobs, events)
        choices = []
        for job in jobs:
            choice = {"index": job.index, "finish_reason": done.get(job.index), "message": {
                "role": "assistant", "content": before_stop(session.tokenizer.decode(job.tokens), job.params.stop)}}
            if req.return_retrieved:
                choice["retrieved_chunk_ids"] = job.retrieved
            choices.append(choice)
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage([ids], jobs)}

    @app.post("/v1/reload")
    async def reload() -> dict:
        """Open the work directory's database again, e.g. after build_db added extra_sources."""
        if session.workdir is None:
            raise RequestError("this server has no database: start it with --workdir.", None, 404, "not_found")

        def reopen():
            with engine.lock:  # between batches: a batch never sees two databases
                r = session.retriever(reload=True)
                return {"database": str(session.workdir), "chunks": len(r), "index": r.meta["index"],
                        "version": (r.version or {}).get("version")}

        try:
            return await asyncio.to_thread(reopen)
        except UserError as e:
            raise RequestError(f"the database did not reload, the one loaded before stays: {e}", None, 409,
                               "reload_failed") from None

    @app.post("/v1/retrieve")
    async def retrieve(req: RetrieveRequest):
        if session.workdir is None:
            raise RequestError("this server has no database: start it with --workdir.", None, 404, "not_found")

        def search():
            with engine.lock:
                r = session.current_retriever()
                hits = r.search(req.queries(), k=req.k)
                return [{"query": q, "neighbours": [
                    {"chunk_id": int(c), "distance": float(d), "text": r.chunk_text(int(c))}
                    for c, d in zip(ids, dist) if c >= 0]} for q, ids, dist in zip(req.queries(), hits.ids, hits.distances)]

        return {"object": "list", "data": await asyncio.to_thread(search)}

    return app
