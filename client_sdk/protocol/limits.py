"""Protocol limits: every bound is a named constant with its unit and the precedent it follows.

The broker may be configured with other values; these are the defaults and the hard ceilings
a peer can rely on (the broker announces the values it enforces in its ``welcome``).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_HEARTBEAT_MS",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "DELIVERY_OVERHEAD_BYTES",
    "FEATURES",
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_FRAME_BYTES_BEFORE_HELLO",
    "MAX_EPOCH_CHARS",
    "MAX_FEATURES",
    "MAX_FEATURE_CHARS",
    "MAX_FRAME_BYTES_CEILING",
    "MAX_GROUP_BYTES",
    "MAX_HEADERS",
    "MAX_HEADER_FIELD_BYTES",
    "MAX_ID",
    "MAX_REASON_BYTES",
    "MAX_REQUEST_TIMEOUT_MS",
    "MAX_SENDER_CHARS",
    "MAX_SEQ",
    "MAX_TOPIC_BYTES",
    "MAX_TOPIC_TOKENS",
    "MIN_HEARTBEAT_MS",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
]

#: The protocol version this implementation speaks (``hello.version`` / ``welcome.version``).
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

#: Length prefix: 4-byte big-endian unsigned integer giving the body length.
FRAME_HEADER_BYTES = 4

#: Largest frame body after ``welcome`` (default); NATS ``max_payload`` defaults to 1 MB too.
MAX_FRAME_BYTES = 1024 * 1024

#: Largest frame body accepted before the peer has said hello / been welcomed. A stranger gets
#: a small budget until it has proved who it is (websockets' handshake limit is of this order).
MAX_FRAME_BYTES_BEFORE_HELLO = 64 * 1024

#: A broker may not announce a frame limit above this (the prefix could say 4 GiB; h2's
#: ``SETTINGS_MAX_FRAME_SIZE`` ceiling is 16 MiB for the same reason).
MAX_FRAME_BYTES_CEILING = 64 * 1024 * 1024

#: Topic length in UTF-8 bytes; MQTT allows 65535, NATS and AWS IoT keep subjects far shorter
#: (AWS IoT: 256 bytes). Long topics cost memory in every router node and every delivery.
MAX_TOPIC_BYTES = 256

#: Tokens in a topic or pattern (depth); AWS IoT allows 8 levels, we allow more for hierarchies.
MAX_TOPIC_TOKENS = 16

#: Headers on one publish: count, and bytes per key or value (NATS headers are free-form but
#: bounded by max_payload; we bound each field to keep logs and memory predictable).
MAX_HEADERS = 32
MAX_HEADER_FIELD_BYTES = 1024

#: Subscription ids and acknowledgement ids are unsigned 32-bit integers.
MAX_ID = 2**32 - 1

#: A close or error reason is a short human-readable string (WebSocket close reasons: 123 bytes).
MAX_REASON_BYTES = 256

#: Heartbeat interval proposed by the broker (NATS pings every 2 minutes; we choose 30 s so that
#: a dead peer behind a silent network cut is found within a minute).
DEFAULT_HEARTBEAT_MS = 30_000
MIN_HEARTBEAT_MS = 1_000

# --- status and commands (docs/protocol.md section 16) --------------------------------------

#: Capabilities a broker may announce in ``welcome.features``; a client uses a new field or
#: operation only when the broker announced it (an older broker would ignore the field).
FEATURES = frozenset({"retain", "request", "group", "history", "sender"})

#: ``welcome.features``: entries, and characters per entry.
MAX_FEATURES = 32
MAX_FEATURE_CHARS = 64

#: Queue group names follow the topic-token rules, at most this many UTF-8 bytes (NATS queue
#: names are unbounded; a group name sits in every router node of the group, so it is bounded).
MAX_GROUP_BYTES = 64

#: ``sender`` is ``mechanism:name``: 256 characters of mechanism, ``:``, 4 096 of name.
MAX_SENDER_CHARS = 256 + 1 + 4096

#: A stream epoch is a short opaque string (Centrifugo's epochs are a few characters).
MAX_EPOCH_CHARS = 64

#: History sequence numbers: 1 to 2**53 - 1, exact in every JSON/JavaScript number.
MAX_SEQ = 2**53 - 1

#: A request the client sends without ``timeout_ms`` gets this (NATS clients default to 2-10 s).
DEFAULT_REQUEST_TIMEOUT_MS = 10_000
#: ``req.timeout_ms`` range on the wire (one hour); a broker may clamp it lower.
MAX_REQUEST_TIMEOUT_MS = 3_600_000

#: A delivery may be longer than the ``pub`` it came from by the fields the broker adds
#: (``sid``, ``retained``, ``sender``, ``seq``, ``epoch``, ``reply``). A client that understands
#: ``welcome.features`` accepts frames up to ``max_frame`` plus this much.
DELIVERY_OVERHEAD_BYTES = 20 * 1024
