"""One exception root for everything multiverso_py raises, and the wire codes that carry
errors from a server or the scheduler back to the caller, mapped in one table."""

from __future__ import annotations

import enum


class MultiversoError(Exception):
    """Root of every error raised by multiverso_py."""


class InvalidArgument(MultiversoError, ValueError):
    """A call got an argument of the wrong shape, dtype or value; nothing was sent."""


class IndexOutOfRange(MultiversoError, IndexError):
    """An index, row id or key lies outside the table; nothing was sent."""


class ConnectFailed(MultiversoError, ConnectionError):
    """No connection could be made to the scheduler or a server."""


class ProtocolError(MultiversoError):
    """A frame or message that does not follow the wire protocol."""


class ConnectionLost(MultiversoError):
    """The connection to a server or the scheduler broke while a request was pending."""


class RequestTimeout(MultiversoError, TimeoutError):
    """A request got no reply within the configured timeout."""


class TableSpecMismatch(MultiversoError):
    """A table was created under a name that exists with another shape, dtype or updater."""


class TableNotFound(MultiversoError):
    """A request named a table that the server or the scheduler does not know."""


class NotInitialized(MultiversoError):
    """An operation needs a running job: call mv.init() first."""


class AuthFailed(ConnectFailed):
    """A connection was refused: no token, or not the job's token."""


class RemoteError(MultiversoError):
    """A server or the scheduler failed while handling a request."""


class ErrorCode(enum.IntEnum):
    """Error codes as they travel in an ERROR reply."""

    INTERNAL = 1
    BAD_REQUEST = 2
    UNKNOWN_TABLE = 3
    SPEC_MISMATCH = 4
    TIMEOUT = 5
    SHUTTING_DOWN = 6
    INVALID_ARGUMENT = 7
    INDEX_OUT_OF_RANGE = 8
    AUTH_FAILED = 9


_CODE_TO_EXCEPTION: dict[ErrorCode, type[MultiversoError]] = {
    ErrorCode.INTERNAL: RemoteError,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.UNKNOWN_TABLE: TableNotFound,
    ErrorCode.SPEC_MISMATCH: TableSpecMismatch,
    ErrorCode.TIMEOUT: RequestTimeout,
    ErrorCode.SHUTTING_DOWN: ConnectionLost,
    ErrorCode.INVALID_ARGUMENT: InvalidArgument,
    ErrorCode.INDEX_OUT_OF_RANGE: IndexOutOfRange,
    ErrorCode.AUTH_FAILED: AuthFailed,
}
_EXCEPTION_TO_CODE = {exc: code for code, exc in _CODE_TO_EXCEPTION.items()}


def code_for(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised while handling a request."""
    for cls in type(exc).__mro__:
        if cls in _EXCEPTION_TO_CODE:
            return _EXCEPTION_TO_CODE[cls]
    return ErrorCode.INTERNAL


def exception_for(code: int, message: str) -> MultiversoError:
    """Rebuild at the caller the exception that a remote handler raised."""
    try:
        cls = _CODE_TO_EXCEPTION[ErrorCode(code)]
    except ValueError:
        cls = RemoteError
    return cls(message)
