"""Keys, the transport-independent auth check, and TLS material."""
