"""rbee's wire protocol: frame types, the msgpack codec and the protocol version."""

from rbee.protocol.codec import Envelope, decode, encode
from rbee.protocol.messages import FRAME_TYPES, PROTOCOL_VERSION

__all__ = ["FRAME_TYPES", "PROTOCOL_VERSION", "Envelope", "decode", "encode"]
