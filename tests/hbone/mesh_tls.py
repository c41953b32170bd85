"""The TLS side of a Python HBONE peer: mutual TLS 1.3 with ALPN h2 to a node proxy, with
a workload certificate chaining to the mesh root."""

import socket
import ssl

TIMEOUT = 5


def connect(gateway, cert, key, root):
    """The TCP socket and the TLS socket over it, to `gateway` (`ip:port`)."""
    host, port = gateway.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(root)
    # The server is named by its SPIFFE ID (a URI SAN), not a DNS name; the chain to the
    # mesh root is still checked.
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    tls = context.wrap_socket(raw)
    assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
    return raw, tls
