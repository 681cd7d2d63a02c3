""":class:`ProtocolError`: a message that cannot be served, carrying what is needed to
answer it anyway."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Self

from inference_worker_client.protocol.codes import RETRYABLE_CODES, Codec, ErrorCode


class Addressable(Protocol):
    """What an error reply is addressed from: a decoded ``Request`` or anything shaped
    like it (the pipeline's reply address)."""

    @property
    def id(self) -> str: ...
    @property
    def app(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def meta(self) -> Mapping[str, Any] | None: ...
    @property
    def codec(self) -> Codec: ...


class ProtocolError(Exception):
    """A message that cannot be served, with whatever addressing fields could be read so
    the worker can still send an error response (attributes may be filled in later).

    An error returned by :class:`~inference_worker_client.protocol.WireCodec` has no traceback,
    cause or context; one it raises has a traceback that starts at the public method
    (whose locals are the caller's payload and the error). Neither reaches a frame that
    held a decompression buffer or decoded tensors, so keeping the error alive (a reject
    waiting for its publish) keeps kilobytes alive, not megabytes.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        id: str | None = None,
        app: str | None = None,
        model: str | None = None,
        reply_to: str | None = None,
        meta: Mapping[str, Any] | None = None,
        codec: Codec | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.app = app
        self.model = model
        self.reply_to = reply_to
        self.meta = meta
        self.codec = codec
        self.retry_after_ms = retry_after_ms

    @classmethod
    def about(
        cls,
        source: Addressable,
        code: ErrorCode,
        message: str,
        *,
        reply_to: str | None = None,
        retry_after_ms: int | None = None,
    ) -> Self:
        """An error answering ``source`` (its id, app, model, meta and codec).

        ``reply_to`` is never taken from ``source``: a topic named by the request is a
        client's claim, and whether an error may go there (the app is authenticated, the
        topic passed the allow-list) is the caller's decision, so it must say so.
        """
        return cls(
            code,
            message,
            id=source.id,
            app=source.app,
            model=source.model,
            reply_to=reply_to,
            meta=source.meta,
            codec=source.codec,
            retry_after_ms=retry_after_ms,
        )

    def detached(self) -> Self:
        """This error without its traceback, cause and context (returns ``self``).

        A traceback keeps every frame it passed through alive with all their locals, and
        ``raise ... from None`` only hides ``__context__``, it does not drop it: an error
        raised while a 64 MiB buffer was a local would pin that buffer for as long as the
        error lives.
        """
        self.__traceback__ = None
        self.__cause__ = None
        self.__context__ = None
        return self

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES
