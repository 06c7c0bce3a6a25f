"""The requests the server accepts and the error every refusal answers with.

Field names and defaults follow OpenAI's completions and chat completions, so existing clients
work unchanged (max_tokens 16 and temperature 1.0 by default, as there). Three fields are this
server's own: `contexts` (passages given to every chunk as neighbours, as `retro-run generate
--context` does), `return_retrieved` (each choice lists the chunk ids it retrieved) and
`ignore_eos` (as vLLM's: every choice runs to max_tokens, for load tests). A field
the server does not know is refused by name, never ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: int = 0
    contexts: list[str] = Field(default_factory=list, max_length=16)
    return_retrieved: bool = False
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says (load tests)
    user: Optional[str] = None  # clients send it; not used

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Union[str, list[str]] = Field(min_length=1)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Union[str, list[str]] = Field(min_length=1)
    k: int = Field(2, ge=1, le=100)

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with `message`, naming `param`."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
