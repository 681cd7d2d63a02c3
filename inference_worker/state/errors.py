"""How the Redis store's failures read: redis-py's exceptions as the contract's errors.

- refused credentials (at connect): `StateAccessDenied`, naming the user and the URL;
- a missing ACL permission (a command or a key outside the pattern): `StateAccessDenied`;
- an outage (connect.OUTAGE: connection errors, a cluster failover) and the error replies
  that mean "soon" (LOADING, BUSY, TRYAGAIN, MASTERDOWN, CLUSTERDOWN): `StateUnavailable`;
- any other error reply (OOM, MISCONF, READONLY, a script error): `StateFailed`, with the
  server's message.

Messages carry the URL without its password (`redact_url`), never the password.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    ResponseError,
)

from inference_worker.security import redact_url
from inference_worker.state.base import StateAccessDenied, StateFailed, StateUnavailable
from inference_worker.state.connect import OUTAGE, transient_reply

_CREDENTIALS = (AuthenticationError, AuthorizationError)


def _inner(exc: BaseException) -> BaseException | None:
    """The first credential or permission error in `exc`'s cause/context chain: the
    cluster client wraps what its startup nodes answered (a refused CLUSTER SLOTS reads
    "Cluster mode is not enabled on this node")."""
    seen = exc.__cause__ or exc.__context__
    for _ in range(5):
        if seen is None or isinstance(seen, (*_CREDENTIALS, NoPermissionError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass(frozen=True)
class ErrorText:
    url: str
    user: str
    prefix: str

    def refused(self, exc: BaseException) -> StateAccessDenied:
        return StateAccessDenied(
            f"Redis at {redact_url(self.url)} refused the credentials of user {self.user!r}: {exc}"
        )

    def denied(self, exc: BaseException) -> StateAccessDenied:
        return StateAccessDenied(
            f"Redis user {self.user!r} at {redact_url(self.url)} lacks permission for "
            f"PING, CLIENT SETNAME, SCRIPT LOAD, EVALSHA (and the commands the scripts run) "
            f"or keys ~{self.prefix}* ({exc}); see brokers/redis/users.acl.example"
        )

    def failed(self, exc: ResponseError) -> StateUnavailable | StateFailed:
        """An error reply: transient ones are an outage."""
        # redis-py strips the error code it maps to a class (OOM, READONLY, NOSCRIPT...)
        # from the text: put it back so the message is the server's.
        code = getattr(exc, "status_code", None)
        text = f"{code} {exc}" if code else str(exc)
        message = f"Redis at {redact_url(self.url)}: {text}"
        if transient_reply(exc, text):
            return StateUnavailable(message)
        return StateFailed(message)

    def at_start(self, exc: Exception) -> Exception | None:
        """What `start()` raises for `exc`, or None when it is no Redis error."""
        if isinstance(exc, _CREDENTIALS):
            return self.refused(exc)
        if isinstance(exc, NoPermissionError):
            return self.denied(exc)
        if isinstance(exc, OUTAGE):
            inner = _inner(exc)
            if isinstance(inner, _CREDENTIALS):
                return self.refused(inner)
            if isinstance(inner, NoPermissionError):
                return self.denied(inner)
            return StateUnavailable(
                f"Redis state store unreachable at {redact_url(self.url)}: {exc}"
            )
        if isinstance(exc, ResponseError):
            return self.failed(exc)
        return None

    def in_call(self, exc: Exception) -> Exception | None:
        """What a script call raises for `exc`, or None when it is no Redis error."""
        if isinstance(exc, NoPermissionError):
            # Retried like an outage (the worker backs off): fixing the ACL recovers.
            return self.denied(exc)
        if isinstance(exc, OUTAGE):
            # The worker retries on StateUnavailable without knowing this is Redis.
            return StateUnavailable(f"Redis at {redact_url(self.url)}: {exc}")
        if isinstance(exc, ResponseError):
            return self.failed(exc)
        return None
