"""The Polygon (Massive) WebSocket wire format, without any I/O.

Parses untrusted client control messages (``auth`` / ``subscribe`` /
``unsubscribe``) into attrs values through cattrs, parses and validates channel
lists, builds the exact status frames Polygon sends, and reads an event's type
and symbol by the per-type field table of ``docs/protocol.md``.
Every malformed input raises :class:`ClientMessageError` with a distinct ``kind`` and
a sentence a client developer can act on.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Final, Generator, Iterable, Literal, NamedTuple, TypeVar, overload

import attrs
import cattrs
import msgspec

from .errors import ClientMessageError

__all__ = [
    "EVERYTHING",
    "MAX_CHANNEL_LENGTH",
    "Channel",
    "EVERYTHING_CHANNEL",
    "ClientMessageError",
    "parse_channel",
    "parse_channel_list",
    "parse_channel_list_steps",
    "run_steps",
    "format_channel_list",
    "channel_texts",
    "PROXY_ROLE",
    "Auth",
    "Subscribe",
    "Unsubscribe",
    "ChannelRequest",
    "FROM_KEY",
    "FROM_SEQ_KEY",
    "JOURNAL_KEY",
    "SeqResume",
    "parse_client_message",
    "auth_message",
    "subscription_message",
    "status_event",
    "statuses_frame",
    "status_frame",
    "CONNECTED",
    "AUTH_SUCCESS",
    "AUTH_FAILED",
    "AUTH_TIMEOUT",
    "MAX_CONNECTIONS",
    "subscription_frame",
    "subscription_frame_steps",
    "error_frame",
    "lowercase_warning",
    "REFUSED_PREFIX",
    "refusal_frame",
    "refused_channels",
    "SYMBOL_FIELD_BY_TYPE",
    "FALLBACK_SYMBOL_FIELDS",
    "EventKey",
    "event_symbol",
]

# --- channels ---------------------------------------------------------------

#: A bare ``*``: the proxy's own extension meaning "every event this proxy receives".
EVERYTHING: Final = "*"
MAX_CHANNEL_LENGTH: Final = 64
_TYPE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9]{0,7}")
_SYMBOL_RE: Final = re.compile(r"[A-Za-z0-9.:/\-]+")


class Channel(NamedTuple):
    """One subscription channel: ``T.AAPL``, ``T.*`` (every symbol of type T) or ``*``.

    A named tuple rather than an attrs class, for cost: a subscribe of 10,000 channels
    hashes each one about a dozen times (the client's set, the registry's indexes, the
    upstream set), and a tuple hashes and compares in C where attrs' generated
    ``__hash__`` is a Python call. Being a tuple, ``Channel("T", "AAPL")`` equals and
    hashes like ``("T", "AAPL")``, so routing finds a channel from the pair it reads from
    an event without building a Channel, and channels sort by (type, symbol).
    """

    ev_type: str
    symbol: str

    @property
    def text(self) -> str:
        """The channel as clients and Polygon write it: ``T.AAPL``, ``T.*``, ``*``."""
        return EVERYTHING if self.ev_type == EVERYTHING else f"{self.ev_type}.{self.symbol}"

    @property
    def is_everything(self) -> bool:
        """True for the proxy's own ``*`` (every event the proxy receives)."""
        return self.ev_type == EVERYTHING

    @property
    def is_type_wildcard(self) -> bool:
        """True for ``TYPE.*`` (every symbol of one event type)."""
        return self.symbol == "*" and self.ev_type != EVERYTHING

    def covers(self, other: Channel) -> bool:
        """True when holding ``self`` upstream already brings every event of ``other``."""
        if self == other or self.is_everything:
            return True
        return self.is_type_wildcard and self.ev_type == other.ev_type

    def __str__(self) -> str:
        return self.text


EVERYTHING_CHANNEL: Final = Channel(EVERYTHING, EVERYTHING)
_T = TypeVar("_T")


def parse_channel(text: str) -> Channel:
    """Parse one channel, split at the FIRST dot (``T.BRK.A`` is type ``T``, symbol ``BRK.A``)."""
    channel = text.strip()
    if not channel:
        raise ClientMessageError("empty_channel", "empty channel in params (check for a stray comma)")
    if len(channel) > MAX_CHANNEL_LENGTH:
        raise ClientMessageError(
            "channel_too_long",
            f"channel is {len(channel)} characters long; at most {MAX_CHANNEL_LENGTH} are allowed",
        )
    if channel == EVERYTHING:
        return EVERYTHING_CHANNEL
    ev_type, dot, symbol = channel.partition(".")
    if not dot or not symbol:
        raise ClientMessageError(
            "bad_channel", f"bad channel {channel!r}: expected TYPE.SYMBOL, TYPE.* or *"
        )
    if not _TYPE_RE.fullmatch(ev_type):
        raise ClientMessageError(
            "bad_channel", f"bad channel {channel!r}: event type {ev_type!r} is not a Polygon type"
        )
    if symbol != "*" and not _SYMBOL_RE.fullmatch(symbol):
        raise ClientMessageError(
            "bad_channel",
            f"bad channel {channel!r}: a symbol may hold letters, digits and . : - / only",
        )
    return Channel(ev_type, symbol)


def parse_channel_list(params: str, *, max_channels: int = 10_000) -> tuple[Channel, ...]:
    """Parse comma-separated ``params``; whitespace around items is ignored, duplicates dropped."""
    return run_steps(parse_channel_list_steps(params, max_channels=max_channels, step=0))


def parse_channel_list_steps(
    params: str, *, max_channels: int = 10_000, step: int = 1000
) -> Generator[None, None, tuple[Channel, ...]]:
    """:func:`parse_channel_list` in slices of ``step`` channels (0: all at once), yielding
    between slices so that a caller can let other work run; returns the channels.

    A slice that is valid (nearly always) is checked by one regular expression and cut
    into (type, symbol) pairs by another, both in C: ~0.3 µs a channel instead of ~3.
    A slice that fails goes through :func:`parse_channel` item by item, which raises
    the error naming the first bad channel.
    """
    count = params.count(",") + 1
    if count > max_channels:
        raise ClientMessageError(
            "too_many_channels",
            f"{count} channels in one message; at most {max_channels} are allowed",
        )
    if step <= 0 or count <= step:
        pieces = [params]
    else:
        items = params.split(",")
        pieces = [",".join(items[start:start + step]) for start in range(0, count, step)]
    parsed: dict[Channel, None] = {}
    for number, piece in enumerate(pieces):
        if number:
            yield
        if _CHANNEL_LIST_RE.fullmatch(piece) and max(map(len, piece.split(","))) <= MAX_CHANNEL_LENGTH:
            channels = dict.fromkeys(map(_new_channel, _CHANNEL_PAIR_RE.findall(piece)))
            if _BARE_STAR in channels:  # the pair pattern reads a bare `*` as ("", "")
                channels = {EVERYTHING_CHANNEL if channel == _BARE_STAR else channel: None for channel in channels}
            parsed.update(channels)
        else:
            parsed.update(dict.fromkeys(parse_channel(item) for item in piece.split(",")))
    return tuple(parsed)


def run_steps(steps: Generator[None, None, _T]) -> _T:
    """Run a generator of steps to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# One channel as parse_channel accepts it, between optional whitespace: `*`, `TYPE.*` or
# `TYPE.SYMBOL` (its length is checked apart: a lookahead here doubled the cost).
_CHANNEL_ITEM = r"\s*(?:\*|[A-Za-z][A-Za-z0-9]{0,7}\.(?:\*|[A-Za-z0-9.:/\-]+))\s*"
_CHANNEL_LIST_RE: Final = re.compile(rf"{_CHANNEL_ITEM}(?:,{_CHANNEL_ITEM})*")
_CHANNEL_PAIR_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9]{0,7})\.([^\s,]+)|\*")
_new_channel = functools.partial(tuple.__new__, Channel)
_BARE_STAR: Final = ("", "")


def format_channel_list(channels: Iterable[Channel]) -> str:
    """The ``params`` text of a subscribe: channels joined by commas."""
    return ",".join(channel_texts(channels))


def channel_texts(channels: Iterable[Channel]) -> list[str]:
    """Each channel's text; joining a Channel's two parts in C costs a third of its ``text``."""
    texts = list(map(".".join, channels))
    if "*.*" in texts:  # the bare `*` joins as "*.*"
        return [EVERYTHING if text == "*.*" else text for text in texts]
    return texts


# --- client actions -----------------------------------------------------------


@attrs.frozen
class _WireAction:
    """The shape every client message must have before it means anything."""

    action: str
    params: str
    role: str | None = None


#: The ``role`` a downstream proxy tier puts in its ``auth`` message (see :class:`Auth`).
PROXY_ROLE: Final = "proxy"


@attrs.frozen
class Auth:
    """``{"action":"auth","params":KEY}``; a proxy tier adds ``"role":"proxy"``.

    The role is this project's extension, sent only by our own filtered tier to the
    tier above it, never to Polygon: it asks for the limits of a link that carries
    many clients' demand (:class:`~proxy.core.session.SessionState`). It is a claim, not a
    credential: only a client holding a key this tier accepts can make it.
    """

    api_key: str
    role: str | None = None


@attrs.frozen
class SeqResume:
    """A downstream proxy's resume by journal seq (our extension, docs/protocol.md): a subscribe of
    ``*`` with ``"from_seq": N, "journal": ID`` asks for every journaled record from seq ``N`` of
    the journal ``ID`` on, then live."""

    from_seq: int
    journal: str


@attrs.frozen
class Subscribe:
    """A client's ``subscribe`` action with its parsed channels, in the order given, and its
    ``from`` (our resume extension: ms since the epoch, or negative ms before now), if any."""
    channels: tuple[Channel, ...]
    from_ms: float | None = None
    #: A downstream proxy's resume by journal seq, if any.
    resume: SeqResume | None = None


@attrs.frozen
class Unsubscribe:
    """A client's ``unsubscribe`` action with its parsed channels."""
    channels: tuple[Channel, ...]


@attrs.frozen
class ChannelRequest:
    """A subscribe or unsubscribe whose channels are not parsed yet (see
    :func:`parse_channel_list_steps`), for callers that parse them in slices."""

    action: str  # "subscribe" or "unsubscribe"
    params: str
    #: A subscribe's ``from`` (resume), checked to be a finite number; None without one.
    from_ms: float | None = None
    #: A subscribe's ``from_seq`` and ``journal`` (a downstream proxy's resume), checked; None without.
    resume: SeqResume | None = None


ClientAction = Auth | Subscribe | Unsubscribe

_converter = cattrs.Converter(forbid_extra_keys=False)


def _strict_str(value: object, _type: type) -> str:
    # cattrs' default for str is str(value), which would turn 42 into "42".
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


_converter.register_structure_hook(str, _strict_str)
_json_object_decoder = msgspec.json.Decoder()


@overload
def parse_client_message(
    message: str | bytes, *, max_channels: int = ..., parse_channels: Literal[True] = ...
) -> ClientAction: ...


@overload
def parse_client_message(
    message: str | bytes, *, max_channels: int = ..., parse_channels: bool
) -> ClientAction | ChannelRequest: ...


def parse_client_message(
    message: str | bytes, *, max_channels: int = 10_000, parse_channels: bool = True
) -> ClientAction | ChannelRequest:
    """Turn one untrusted client frame into an action, or raise :class:`ClientMessageError`.

    With ``parse_channels=False`` a subscribe or unsubscribe comes back as a
    :class:`ChannelRequest`, its channels for the caller to parse.
    """
    if isinstance(message, bytes):
        # Many clients send JSON as bytes (orjson.dumps), which becomes a binary frame:
        # UTF-8 JSON is the same message whatever the frame type.
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientMessageError(
                "binary_frame", "binary frame is not UTF-8 JSON; send the JSON message as text"
            ) from None
    try:
        decoded = _json_object_decoder.decode(message)
    except msgspec.DecodeError as error:
        raise ClientMessageError("not_json", f"message is not valid JSON ({_decode_error_text(message, error)})") from None
    except RecursionError:
        raise ClientMessageError("too_deep", "message is nested too deeply to be a control message") from None
    if not isinstance(decoded, dict):
        raise ClientMessageError(
            "not_object",
            'message must be one JSON object like {"action":"subscribe","params":"T.AAPL"}',
        )
    if "action" not in decoded:
        raise ClientMessageError("missing_action", 'message has no "action"')
    if "params" not in decoded:
        raise ClientMessageError("missing_params", 'message has no "params"')
    try:
        wire = _converter.structure(decoded, _WireAction)
    except cattrs.ClassValidationError as error:
        problems = " ".join(cattrs.transform_error(error))
        field = next((name for name in ("params", "role") if f"$.{name}" in problems), "action")
        raise ClientMessageError(f"{field}_not_string", f'"{field}" must be a string') from None
    if wire.action == "auth":
        if not wire.params:
            raise ClientMessageError("empty_params", 'auth needs the API key in "params"')
        return Auth(wire.params, wire.role)
    if wire.action in ("subscribe", "unsubscribe"):
        from_ms = _read_from(wire.action, decoded)
        resume = _read_seq_resume(wire.action, decoded)
        if resume is not None and from_ms is not None:
            raise ClientMessageError("bad_from", f'"{FROM_KEY}" and "{FROM_SEQ_KEY}" cannot come together; '
                                                 f"{_NOTHING_APPLIED}")
        if not wire.params.strip():
            raise ClientMessageError("empty_params", f'{wire.action} needs channels in "params"')
        if not parse_channels:
            return ChannelRequest(wire.action, wire.params, from_ms, resume)
        channels = parse_channel_list(wire.params, max_channels=max_channels)
        return Subscribe(channels, from_ms, resume) if wire.action == "subscribe" else Unsubscribe(channels)
    raise ClientMessageError(
        "unknown_action",
        f"unknown action {wire.action[:40]!r}; expected auth, subscribe or unsubscribe",
    )


#: The key of the resume extension in a subscribe (docs/protocol.md).
FROM_KEY: Final = "from"
_NOTHING_APPLIED = "nothing of this subscribe was applied"


def _read_from(action: str, message: dict[str, Any]) -> float | None:
    """A subscribe's ``from``: None without one; raises :class:`ClientMessageError` (kind
    ``bad_from``) when it is not a finite number or comes with another action."""
    if FROM_KEY not in message:
        return None
    value = message[FROM_KEY]
    if action != "subscribe":
        raise ClientMessageError("bad_from", f'"from" is only for subscribe, not {action}; this {action} '
                                             "was not applied")
    try:
        number = None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:
        number = None
    if number is None or not math.isfinite(number):
        shown = msgspec.json.encode(value).decode()[:40]
        raise ClientMessageError("bad_from", f'"from" must be a number: milliseconds since the epoch, or '
                                             f"negative milliseconds before now (not {shown}); {_NOTHING_APPLIED}")
    return number


#: The keys of a downstream proxy's resume by journal seq in a subscribe (docs/protocol.md).
FROM_SEQ_KEY: Final = "from_seq"
JOURNAL_KEY: Final = "journal"
#: A journal's id is short (ours are 32 hex digits); anything longer is not one.
MAX_JOURNAL_ID_LENGTH = 64


def _read_seq_resume(action: str, message: dict[str, Any]) -> SeqResume | None:
    """A subscribe's ``from_seq`` and ``journal``: None without them; raises
    :class:`ClientMessageError` (kind ``bad_from``) unless both are there and well formed
    (``from_seq`` an integer of at least 1, ``journal`` a short non-empty string)."""
    if FROM_SEQ_KEY not in message and JOURNAL_KEY not in message:
        return None
    if action != "subscribe":
        raise ClientMessageError("bad_from", f'"{FROM_SEQ_KEY}" is only for subscribe, not {action}; this '
                                             f"{action} was not applied")
    seq, journal = message.get(FROM_SEQ_KEY), message.get(JOURNAL_KEY)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        shown = msgspec.json.encode(seq).decode()[:40]
        raise ClientMessageError("bad_from", f'"{FROM_SEQ_KEY}" must be a journal seq (an integer of at least 1, '
                                             f'with "{JOURNAL_KEY}"), not {shown}; {_NOTHING_APPLIED}')
    if not isinstance(journal, str) or not journal or len(journal) > MAX_JOURNAL_ID_LENGTH:
        shown = msgspec.json.encode(journal).decode()[:40]
        raise ClientMessageError("bad_from", f'"{JOURNAL_KEY}" must name the journal "{FROM_SEQ_KEY}" is a seq of '
                                             f"(a string of 1 to {MAX_JOURNAL_ID_LENGTH} characters), not {shown}; "
                                             f"{_NOTHING_APPLIED}")
    return SeqResume(seq, journal)


#: A \\uD800-\\uDBFF escape not followed by a \\uDC00-\\uDFFF one, or the reverse, in JSON text: an odd
#: number of backslashes before the ``u`` (an even number escapes the backslashes themselves).
_LONE_SURROGATE = re.compile(
    r"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\)(?<![dD][89abAB][0-9a-fA-F]{2})(?:\\\\)*(\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


def _decode_error_text(message: str, error: msgspec.DecodeError) -> str:
    """msgspec's reason, unless it misreports a lone surrogate escape as truncated input."""
    if "truncated" in str(error) or "surrogate" in str(error):
        lone = _LONE_SURROGATE.search(message)
        if lone is not None:
            return f"lone surrogate {lone.group(1) or lone.group(2)} in a string"
    return str(error)


def auth_message(api_key: str, role: str | None = None) -> str:
    """The ``auth`` control message a tier sends its upstream (with ``role``, our extension, when given)."""
    message = {"action": "auth", "params": api_key}
    if role is not None:
        message["role"] = role
    return msgspec.json.encode(message).decode()


def subscription_message(action: str, channels: Iterable[Channel], resume: SeqResume | None = None) -> str:
    """A ``subscribe`` or ``unsubscribe`` control message for ``channels`` (a subscribe with
    ``resume``: a downstream proxy's resume by journal seq)."""
    # Channel texts need no escaping (parse_channel); a tier link may send tens of thousands a second.
    message = f'{{"action":"{action}","params":"' + format_channel_list(channels) + '"'
    if resume is not None:
        message += (f',"{FROM_SEQ_KEY}":{int(resume.from_seq)},"{JOURNAL_KEY}":'
                    + msgspec.json.encode(resume.journal).decode())
    return message + "}"


# --- status frames --------------------------------------------------------------


def status_event(status: str, message: str) -> dict[str, str]:
    """One status event as a dict, in Polygon's shape."""
    return {"ev": "status", "status": status, "message": message}


def statuses_frame(events: list[dict[str, str]]) -> str:
    """Several status events in one frame (a JSON array), as Polygon answers a subscribe."""
    return msgspec.json.encode(events).decode()


def status_frame(status: str, message: str) -> str:
    """One status as Polygon frames it: ``[{"ev":"status","status":...,"message":...}]``."""
    return msgspec.json.encode([status_event(status, message)]).decode()


CONNECTED: Final = status_frame("connected", "Connected Successfully")
AUTH_SUCCESS: Final = status_frame("auth_success", "authenticated")
AUTH_FAILED: Final = status_frame("auth_failed", "authentication failed")
AUTH_TIMEOUT: Final = status_frame("auth_timeout", "No authentication request received.")
MAX_CONNECTIONS: Final = status_frame("max_connections", "Maximum number of connections exceeded.")


def subscription_frame(verb: str, channels: Iterable[Channel]) -> str:
    """``subscribed to: X`` / ``unsubscribed to: X``, one success status per channel."""
    return run_steps(subscription_frame_steps(verb, tuple(channels), step=0))


def subscription_frame_steps(
    verb: str, channels: tuple[Channel, ...], *, step: int = 1000
) -> Generator[None, None, str]:
    """:func:`subscription_frame` in slices of ``step`` channels (0: at once), yielding between.

    Polygon's format, one status object per channel (10,000 channels make a 720 kB
    frame), written as text around the channel names: they hold only letters, digits
    and ``.:/-*`` (:func:`parse_channel`), so nothing needs escaping, and joining
    strings costs a tenth of building and encoding a dict per channel.
    """
    if not channels:
        return "[]"
    head = f'{{"ev":"status","status":"success","message":"{verb} to: '
    size = step if step > 0 else len(channels)
    parts = []
    for start in range(0, len(channels), size):
        if start:
            yield
        parts.append(f'"}},{head}'.join(channel_texts(channels[start:start + size])))
    return f"[{head}" + f'"}},{head}'.join(parts) + '"}]'


def error_frame(message: str) -> str:
    """An ``error`` status frame; the connection stays open."""
    return status_frame("error", message)


#: How many suspect channels a lowercase warning spells out.
_WARN_AT_MOST = 5


def lowercase_warning(channels: Iterable[Channel]) -> str | None:
    """A ``warning`` status for channels with lowercase letters, or None.

    Polygon's symbols and event types are uppercase in every market, and it
    acknowledges any channel, so ``T.aapl`` is subscribed and silently brings
    nothing. The acknowledgement stays as Polygon's; this says what was probably meant.
    """
    suspects = [channel for channel in channels
                if not channel.is_everything and channel.text != channel.text.upper()]
    if not suspects:
        return None
    shown = ", ".join(f"{channel.text} (did you mean {channel.text.upper()}?)" for channel in suspects[:_WARN_AT_MOST])
    more = f" and {len(suspects) - _WARN_AT_MOST} more" if len(suspects) > _WARN_AT_MOST else ""
    return status_frame(
        "warning",
        f"symbols and event types are uppercase: {shown}{more} will bring no events as written",
    )


#: How a tier words an upstream refusal it relays to the clients holding the channels.
REFUSED_PREFIX: Final = "upstream refused "


def refusal_frame(channels: Iterable[Channel], reason: str) -> str:
    """An ``error`` status naming the channels upstream refused and why, e.g.
    ``upstream refused T.AAPL,T.MSFT (channel limit: ...)``; those channels are dropped."""
    return error_frame(f"{REFUSED_PREFIX}{format_channel_list(channels)} ({reason})")


def refused_channels(message: str) -> tuple[Channel, ...] | None:
    """The channels a :func:`refusal_frame` message names, or None for any other message."""
    if not message.startswith(REFUSED_PREFIX):
        return None
    listed = message[len(REFUSED_PREFIX):].split(" ", 1)[0]
    try:
        return parse_channel_list(listed, max_channels=len(listed))
    except ClientMessageError:
        return None


# --- events -----------------------------------------------------------------------

#: The field that holds the symbol, per event type (docs/protocol.md's table).
SYMBOL_FIELD_BY_TYPE: Final[dict[str, str]] = {
    **dict.fromkeys(("T", "Q", "A", "AM", "FMV", "LV"), "sym"),
    **dict.fromkeys(("LULD", "NOI", "V"), "T"),
    **dict.fromkeys(("XT", "XQ", "XA", "XAS", "XL2", "CA", "CAS"), "pair"),
    "C": "p",
}
#: Where an event type is not in the table, the first of these holding a string is the symbol.
FALLBACK_SYMBOL_FIELDS: Final = ("sym", "pair", "T")


class EventKey(msgspec.Struct):
    """The only fields routing reads from an event; msgspec skips all others unparsed."""

    ev: object = None
    sym: object = None
    T: object = None
    pair: object = None
    p: object = None


def event_symbol(key: EventKey) -> str | None:
    """The symbol of an event, or None where its type or symbol cannot be read."""
    ev = key.ev
    if not isinstance(ev, str):
        return None
    field = SYMBOL_FIELD_BY_TYPE.get(ev)
    if field is not None:
        value = getattr(key, field)
        return value if isinstance(value, str) else None
    for field in FALLBACK_SYMBOL_FIELDS:
        value = getattr(key, field)
        if isinstance(value, str):
            return value
    return None
