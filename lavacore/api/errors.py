"""The one error every API operation raises: a LAVA fault code, a one-line message, and
the HTTP status the REST side answers with. Never a traceback: a client sees the message."""

# LAVA's codes (lava_scheduler_app and linaro_django_xmlrpc). XML-RPC faults carry them;
# REST maps them to HTTP statuses.
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
TOO_LARGE = 413
UNAVAILABLE = 503
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL = -32603

_HTTP = {
    BAD_REQUEST: 400, UNAUTHORIZED: 401, FORBIDDEN: 403, NOT_FOUND: 404, CONFLICT: 409,
    TOO_LARGE: 413, UNAVAILABLE: 503, PARSE_ERROR: 400, INVALID_REQUEST: 400,
    METHOD_NOT_FOUND: 404, INVALID_PARAMS: 400, INTERNAL: 500,
}


class ApiError(Exception):
    """A refused request. ``code`` is the XML-RPC fault code (LAVA's), ``status`` the
    HTTP status of the REST answer (409 for "already exists", where LAVA says 400)."""

    def __init__(self, code, message, status=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _HTTP.get(code, 400)

    def __str__(self):
        return self.message


def bad_request(message):
    return ApiError(BAD_REQUEST, message)


def not_found(message):
    return ApiError(NOT_FOUND, message)


def conflict(message):
    # LAVA answers 400 ("Bad request: ... already exists?"); REST says 409.
    return ApiError(BAD_REQUEST, message, status=409)


def unauthorized(message="Authentication with user and token required for this API."):
    return ApiError(UNAUTHORIZED, message)
