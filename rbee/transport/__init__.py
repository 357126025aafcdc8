"""ZeroMQ transport: request/reply and token streams, with deadlines and rbee errors."""
