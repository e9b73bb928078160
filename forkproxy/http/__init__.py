"""HTTP/1.1 as a codec, free of I/O: heads and framing towards the upstream (``wire``), the chunked
coding (``chunked``), SSE events (``sse``), header rules (``headers``), request targets (``targets``)
and the HTTP side of a tunnel (``handshake``). Nothing here reads or writes a socket."""
