"""The HTTP/1.1 side of the proxy: request parsing and response building, without I/O."""
