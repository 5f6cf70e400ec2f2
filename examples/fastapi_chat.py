"""A chat API for the AI SDK's ``useChat``, on FastAPI, shared by every worker process.

``POST /api/chat`` takes what ``useChat``'s default transport sends (``{"id": <chat id>,
"messages": [...]}``; only the last message, the user's new one, is read) and answers the
UI message stream as Server-Sent Events, which ``useChat`` renders as it arrives::

    VEL_EXAMPLE_TOKENS='alice-token=alice,bob-token=bob' \\
        uvicorn examples.fastapi_chat:app --workers 4 --port 8000
    curl -N localhost:8000/api/chat -H 'authorization: Bearer alice-token' -d '{"id": "c1",
      "messages": [{"role": "user", "parts": [{"type": "text", "text": "My name is Alice"}]}]}'

Each request may land on any worker; with ``session_storage='redis'`` they all see the same
history. Safe by construction:

- the conversation continued is the authenticated user's own: vel's session id is built on the
  server from the user (from a verified credential) and the chat id, never taken from the body;
- the history is the server's: earlier messages the client sends back are ignored, so a client
  cannot put words in the assistant's mouth.

Configuration: the library's environment (``POSTGRES_DSN``, ``REDIS_URL``, ``VEL_*``),
``OPENAI_API_KEY``/``OPENAI_BASE_URL`` for the model, ``VEL_EXAMPLE_STORAGE`` (default
``redis``), ``VEL_EXAMPLE_MODEL`` (default ``gpt-4o-mini``) and ``VEL_EXAMPLE_TOKENS``
(``token=user,...``, this example's stand-in for real authentication).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from vel import Agent
from vel.sse import UI_MESSAGE_STREAM_HEADERS, sse_stream


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One Agent per worker process, opened with the app and closed with it: closing drains
    # what this worker has not yet written behind to Postgres.
    async with Agent(
        id="chat",
        model={"provider": "openai", "model": os.environ.get("VEL_EXAMPLE_MODEL", "gpt-4o-mini")},
        session_storage=os.environ.get("VEL_EXAMPLE_STORAGE", "redis"),
        system_prompt="You are a concise assistant.",
    ) as agent:
        app.state.agent = agent
        yield


app = FastAPI(title="vel chat", lifespan=lifespan)


def get_agent(request: Request) -> Agent:
    agent: Agent = request.app.state.agent
    return agent


def _tokens() -> dict[str, str]:
    pairs = (item.partition("=") for item in os.environ.get("VEL_EXAMPLE_TOKENS", "").split(","))
    return {token.strip(): user.strip() for token, _, user in pairs if token.strip() and user}


def current_user(
    credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
    ],
) -> str:
    """The id of the user the request is authenticated as.

    Replace this with your application's authentication (session cookie, OAuth/OIDC token
    verification, ...): what matters is that the user id comes from a verified credential.
    """
    if credentials is not None:
        for token, user in _tokens().items():
            if secrets.compare_digest(credentials.credentials.encode(), token.encode()):
                return user
    raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})


class UIPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    parts: list[UIPart]


class ChatRequest(BaseModel):
    """The body ``useChat``'s ``DefaultChatTransport`` posts (extra fields are ignored)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the chat id")
    messages: list[UIMessage] = Field(min_length=1)


def session_id_for(user: str, chat_id: str) -> str:
    """vel's session id of one chat of one user. The chat id holds no '/', so no pair of
    (user, chat) can name another pair's session."""
    return f"{user}/{chat_id}"


@app.post("/api/chat")
async def chat(
    request: ChatRequest,
    user: Annotated[str, Depends(current_user)],
    agent: Annotated[Agent, Depends(get_agent)],
) -> StreamingResponse:
    last = request.messages[-1]
    text = "".join(p.text or "" for p in last.parts if p.type == "text")
    if last.role != "user" or not text:
        raise HTTPException(422, "the last message must be the user's, with text")
    events: AsyncIterator[dict[str, Any]] = agent.run_stream(
        {"message": text}, session_id=session_id_for(user, request.id)
    )
    # run_stream reports failures as its last event, so the response always ends cleanly;
    # a client that goes away ends the turn, which then stores nothing.
    return StreamingResponse(sse_stream(events), headers=UI_MESSAGE_STREAM_HEADERS)
