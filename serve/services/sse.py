"""Server-sent events framing shared by chat and text completions.

Each chunk goes out as one `data: <json>` event; the stream ends with `data: [DONE]`.
The 200 is sent with the first byte, so an error after it cannot change the status:
it goes out as the next event, an OpenAI error body (from the one error table),
and the stream still ends with `[DONE]` — as vLLM's server does.

Events are bytes (what the response writes), and a chunk source may yield an event it framed itself
(bytes) beside models: chat streams encode their per-token chunks from pre-encoded parts
(`serve/services/chat.py`, `ChunkFrames`), which costs a fraction of a model per token.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator

from pydantic import BaseModel

from serve.errors import to_error

logger = logging.getLogger("secondstage.sse")

DONE = b"data: [DONE]\n\n"


def event(chunk: BaseModel) -> bytes:
    """One `data:` event; a chunk without usage leaves the field out, as vLLM's server does."""
    exclude = {"usage"} if getattr(chunk, "usage", True) is None else None
    # The serializer's bytes as they are (model_dump_json would decode them to a str, the response encode it back).
    return b"data: " + chunk.__pydantic_serializer__.to_json(chunk, exclude=exclude) + b"\n\n"


async def sse(chunks: AsyncGenerator[BaseModel | bytes, None], stream_id: str) -> AsyncGenerator[bytes, None]:
    """Frame `chunks` as SSE events (bytes: an event framed already): an error becomes the last chunk, then `[DONE]`."""
    # Closing this stream (the client left) closes the chunk source at once, which aborts its engine requests.
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk if isinstance(chunk, bytes) else event(chunk)
        except Exception as exc:  # the 200 is already sent: the error goes out as the next chunk
            _, body = to_error(exc)
            logger.exception("stream %s failed", stream_id)
            yield f"data: {json.dumps(body)}\n\n".encode()
    yield DONE
