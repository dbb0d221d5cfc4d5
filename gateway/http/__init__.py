"""The HTTP/1.1 data plane: asyncio protocols on uvloop, heads parsed by httptools (llhttp)."""
