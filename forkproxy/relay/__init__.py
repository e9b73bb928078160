"""Relaying an upstream reply to the client: whole (``buffered``), unit by unit (``stream``), or joined
both ways after a 101 (``tunnel``, with ``wsmessages`` for WebSocket message hooks)."""
