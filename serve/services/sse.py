"""Server-sent events framing shared by chat and text completions.

Each chunk goes out as one `data: <json>` event; the stream ends with `data: [DONE]`.
The 200 is sent with the first byte, so an error after it cannot change the status:
it goes out as the next event, an OpenAI error body (from the one error table),
and the stream still ends with `[DONE]` — as vLLM's server does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator

from pydantic import BaseModel

from serve.errors import to_error

logger = logging.getLogger("secondstage.sse")

DONE = "data: [DONE]\n\n"


def event(chunk: BaseModel) -> str:
    """One `data:` event; a chunk without usage leaves the field out, as vLLM's server does."""
    exclude = {"usage"} if getattr(chunk, "usage", True) is None else None
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


async def sse(chunks: AsyncGenerator[BaseModel, None], stream_id: str) -> AsyncGenerator[str, None]:
    """Frame `chunks` as SSE events: an error becomes the last chunk, then `[DONE]`."""
    # Closing this stream (the client left) closes the chunk source at once, which aborts its engine requests.
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield event(chunk)
        except Exception as exc:  # the 200 is already sent: the error goes out as the next chunk
            _, body = to_error(exc)
            logger.exception("stream %s failed", stream_id)
            yield f"data: {json.dumps(body)}\n\n"
    yield DONE
