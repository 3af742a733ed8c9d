"""LAVA protocol v3 frames: decoding, validation and encoding, with no sockets.

Both ends of the control channel are ROUTER sockets. What the master's application sees
is ``[peer_identity, ACTION, args...]``; what the worker's sees is ``[b"master", ACTION,
args...]``. Every frame is checked here before anyone uses it,
so a malformed message becomes a :class:`ProtocolError` naming what was wrong, never an
IndexError deep inside a service.
"""

import collections
import lzma
import re

PROTOCOL_VERSION = 3
MASTER_IDENTITY = b"master"

# Worker -> master
HELLO = "HELLO"
HELLO_RETRY = "HELLO_RETRY"
PING = "PING"
START_OK = "START_OK"
END = "END"
# Master -> worker
HELLO_OK = "HELLO_OK"
PONG = "PONG"
START = "START"
CANCEL = "CANCEL"
STATUS = "STATUS"
END_OK = "END_OK"

# lava-slave refuses other hostnames; the master refuses them too so that an identity
# can always be printed safely in a log line.
HOSTNAME_RE = re.compile(r"^[-_a-zA-Z0-9.]+$")
MAX_HOSTNAME = 255
# Job ids are stored as 64-bit signed integers (SQLite INTEGER, PostgreSQL BIGINT): a
# larger one can name no job, and binding it would raise OverflowError deep in a service.
MAX_JOB_ID = 2 ** 63 - 1
# END's description is inflated at most to this size unless the caller says otherwise.
DESCRIPTION_LIMIT = 8 * 1024 * 1024
INFLATE_CHUNK = 1024 * 1024


class ProtocolError(ValueError):
    """A message that does not follow protocol v3. The text says what was wrong."""


def _text(frame, what):
    try:
        return bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("%s is not valid UTF-8" % what) from None


def _int(frame, what):
    text = _text(frame, what)
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ProtocolError("%s is not a decimal integer: %r" % (what, text[:40]))
    return int(text)


def job_id(frame, what="job id"):
    """A job id frame (decimal ASCII) as an int within what storage holds."""
    value = _int(frame, what)
    if not 0 < value <= MAX_JOB_ID:
        raise ProtocolError("%s out of range: %d" % (what, value))
    return value


def peer_name(frame):
    """A printable name for a peer identity, whatever bytes it holds."""
    try:
        name = bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        return repr(bytes(frame)[:64])
    if HOSTNAME_RE.match(name) and len(name) <= MAX_HOSTNAME:
        return name
    return repr(name[:64])


def check_hostname(name):
    if not name or len(name) > MAX_HOSTNAME or not HOSTNAME_RE.match(name):
        raise ProtocolError("invalid hostname %r (allowed: letters, digits, '-', '_', '.')"
                            % name[:64])
    return name


class LogInfo(collections.namedtuple("LogInfo", "lines results")):
    """What lavacore's worker adds to END (frame 4, which LAVA's master never reads): how
    many log lines, and of them results lines, its runner sent for the job. The master
    compares with what it stored; when they differ it waits for the runner's whole log,
    which the worker attaches (frame 5, lzma) to every END it has to send again."""

    def encode(self):
        return b"log-lines=%d results=%d" % (self.lines, self.results)


_LOG_INFO = re.compile(rb"^log-lines=(\d{1,12}) results=(\d{1,12})$")


def _log_info(frame):
    found = _LOG_INFO.match(bytes(frame))
    if found is None:
        return None  # not ours (or empty): the END is taken as lava-slave's
    return LogInfo(int(found.group(1)), int(found.group(2)))


class Message:
    """One decoded message. ``args`` holds the typed fields of the action."""

    __slots__ = ("action", "args")

    def __init__(self, action, *args):
        self.action = action
        self.args = args

    def __repr__(self):
        return "Message(%s, %r)" % (self.action, self.args)

    def __eq__(self, other):
        return isinstance(other, Message) and (self.action, self.args) == (other.action, other.args)


# action -> (minimum frames after the action, decoder of those frames). Extra trailing
# frames are ignored as LAVA's master did (2020.04+ slaves append their version to HELLO).
def _decode_hello(frames):
    # LAVA 2020.04+ slaves add their version; lavacore's worker then adds an instance
    # token, new at each start, which tells a restart from a second worker of that name.
    return (_int(frames[0], "protocol version"),
            _short(frames[1], "worker version") if len(frames) > 1 else None,
            _short(frames[2], "worker instance") if len(frames) > 2 else None)


def _short(frame, what, limit=200):
    text = _text(frame, what)
    if len(text) > limit or not text.isprintable():
        raise ProtocolError("%s is not a short printable text" % what)
    return text


def _decode_job(frames):
    return (job_id(frames[0]),)


def _decode_end(frames):
    errors = bytes(frames[1]).decode("utf-8", errors="replace")
    return (job_id(frames[0]), errors, bytes(frames[2]),
            _log_info(frames[3]) if len(frames) > 3 else None,
            bytes(frames[4]) if len(frames) > 4 and frames[4] else None)


def _decode_none(frames):
    return ()


def _decode_pong(frames):
    return (_int(frames[0], "ping interval"),)


def _decode_start(frames):
    texts = [_text(f, name) for f, name in zip(
        frames[1:], ("definition", "device", "dispatcher", "env", "env_dut"))]
    return (job_id(frames[0]), *texts)


FROM_WORKER = {
    HELLO: (1, _decode_hello),
    HELLO_RETRY: (1, _decode_hello),
    PING: (0, _decode_none),
    START_OK: (1, _decode_job),
    END: (3, _decode_end),
}

TO_WORKER = {
    HELLO_OK: (0, _decode_none),
    PONG: (1, _decode_pong),
    START: (6, _decode_start),
    CANCEL: (1, _decode_job),
    STATUS: (1, _decode_job),
    END_OK: (1, _decode_job),
}


def _decode(frames, table):
    if not frames:
        raise ProtocolError("empty message")
    action = _text(frames[0], "action")
    if action not in table:
        raise ProtocolError("unknown action %r" % action[:40])
    count, decoder = table[action]
    rest = frames[1:]
    if len(rest) < count:
        raise ProtocolError("%s needs %d frame(s) after the action, got %d"
                            % (action, count, len(rest)))
    if action == START and len(rest) != count:
        # lava-slave unpacks START as a 6-tuple: more or fewer is an error.
        raise ProtocolError("START needs exactly 6 frames after the action, got %d" % len(rest))
    return Message(action, *decoder(rest))


def decode_from_worker(frames):
    """Decode what the master received after the peer identity frame."""
    return _decode(frames, FROM_WORKER)


def decode_from_master(frames):
    """Decode what a worker received after the ``master`` identity frame."""
    return _decode(frames, TO_WORKER)


def _b(value):
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return str(value).encode()
    return value.encode("utf-8")


# Encoders return the frames after the routing identity.
def hello(retry=False, version=None, instance=None):
    frames = [_b(HELLO_RETRY if retry else HELLO), _b(PROTOCOL_VERSION)]
    if version is not None or instance is not None:
        frames.append(_b(version or ""))
    if instance is not None:
        frames.append(_b(instance))
    return frames


def ping():
    return [b"PING"]


def start_ok(job_id):
    return [b"START_OK", _b(job_id)]


def end(job_id, errors, description, log_info=None, log_copy=None):
    frames = [b"END", _b(job_id), _b(errors), _b(description)]
    if log_info is not None:
        frames.append(log_info.encode())
        if log_copy:
            frames.append(log_copy)
    return frames


def hello_ok():
    return [b"HELLO_OK"]


def pong(interval):
    return [b"PONG", _b(int(interval))]


def start(job_id, definition, device, dispatcher, env, env_dut):
    return [b"START", _b(job_id), _b(definition), _b(device), _b(dispatcher), _b(env),
            _b(env_dut)]


def cancel(job_id):
    return [b"CANCEL", _b(job_id)]


def status(job_id):
    return [b"STATUS", _b(job_id)]


def end_ok(job_id):
    return [b"END_OK", _b(job_id)]


def compress_description(text):
    """END's description frame: the .xz container of description.yaml, as lava-slave sends."""
    return lzma.compress(_b(text))


class TooLarge(ProtocolError):
    """Compressed data that inflates beyond the limit it was read with."""


def inflate(data, limit, what="data", sink=None):
    """lzma data (one or more concatenated .xz streams, as lzma.decompress reads) inflated
    as a stream: never more than ``limit`` bytes, whatever the data claims. Returns the
    bytes, or, with ``sink`` (a callable taking each chunk), their count. TooLarge past the
    limit; ProtocolError for corrupt or truncated data."""
    data = bytes(data)
    chunks = []
    size = 0
    while data:
        inflater = lzma.LZMADecompressor()
        pending = data
        while True:
            try:
                chunk = inflater.decompress(pending, max_length=min(INFLATE_CHUNK,
                                                                    limit - size + 1))
            except lzma.LZMAError as exc:
                raise ProtocolError("%s is not valid lzma data: %s" % (what, exc)) from None
            pending = b""
            size += len(chunk)
            if size > limit:
                raise TooLarge("%s inflates to more than %d bytes" % (what, limit))
            if chunk:
                if sink is not None:
                    sink(chunk)
                else:
                    chunks.append(chunk)
            if inflater.eof:
                data = inflater.unused_data
                break
            if inflater.needs_input:
                raise ProtocolError("%s is truncated lzma data" % what)
        if data and not data.lstrip(b"\0"):
            break  # stream padding after the last stream, as the xz format allows
    return size if sink is not None else b"".join(chunks)


def decompress_description(data, limit=DESCRIPTION_LIMIT):
    """Inverse of :func:`compress_description`, inflated at most to ``limit`` bytes;
    raises TooLarge beyond it, ProtocolError on corrupt data."""
    return inflate(data, limit, "END description").decode("utf-8", errors="replace")
