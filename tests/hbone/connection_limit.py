"""A peer with valid workload certificates against the HBONE server's connection limits,
with the `h2` package over Python's TLS (`mesh_tls`).

Usage: connection_limit.py GATEWAY_IP:PORT TARGET_IP:PORT ROOT HELD CERT KEY OTHER_CERT
       OTHER_KEY

1. Opens HELD connections with CERT, one after the other, each with a CONNECT to TARGET
   that must be answered 200; the tunnels stay open, idle.
2. Opens one more with CERT and sends a CONNECT: how that connection ends.
3. Opens one with OTHER_CERT (another identity, same address): a CONNECT and `GET /ip`.
4. On the first held connection: `GET /ip` through its open tunnel, then a new CONNECT and
   `GET /ip` through it.

Prints one JSON line: {"refused": {"goaway": CODE, "debug": TEXT, "status": S},
"other": RESPONSE, "held_tunnel": RESPONSE, "held_new_stream": RESPONSE}; a RESPONSE is
the HTTP response read through a tunnel (or the CONNECT's status when it is not 200).
"""

import json
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions

import mesh_tls


class Peer:
    """One HBONE connection: the TLS socket, its HTTP/2 state, and what each stream got."""

    def __init__(self, gateway, cert, key, root):
        self.raw, self.tls = mesh_tls.connect(gateway, cert, key, root)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.flush()
        self.status, self.data, self.ended = {}, {}, set()
        self.terminated = None

    def flush(self):
        self.tls.sendall(self.h2.data_to_send())

    def read(self):
        """Reads what came and handles its events; False at the end of the connection."""
        try:
            data = self.tls.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            return False
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        if self.terminated is None:
            self.flush()
        return True

    def connect(self, target):
        """Sends a CONNECT; its stream and status (None when the connection ended first)."""
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [(":method", "CONNECT"), (":authority", target)])
        self.flush()
        while stream not in self.status and self.terminated is None and self.read():
            pass
        return stream, self.status.get(stream)

    def get(self, stream, target):
        """`GET /ip` through the tunnel of `stream`; the response, once the application
        closed."""
        request = f"GET /ip HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        self.h2.send_data(stream, request.encode())
        self.flush()
        while stream not in self.ended and self.terminated is None and self.read():
            pass
        return self.data.get(stream, b"").decode(errors="replace")

    def tunnel(self, target):
        stream, status = self.connect(target)
        return self.get(stream, target) if status == 200 else status

    def close(self):
        try:
            self.h2.close_connection()
            self.flush()
            self.tls.unwrap()
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass  # the server may have closed first
        self.raw.close()


def main():
    gateway, target, root, held, cert, key, other_cert, other_key = sys.argv[1:9]
    peers = []
    for _ in range(int(held)):
        peer = Peer(gateway, cert, key, root)
        stream, status = peer.connect(target)
        assert status == 200, f"held connection {len(peers)}: CONNECT answered {status}"
        peers.append((peer, stream))

    refused = Peer(gateway, cert, key, root)
    _, status = refused.connect(target)
    # A refusal comes before any answer; a connection that was served reports its status.
    while status is None and refused.terminated is None and refused.read():
        pass
    goaway = refused.terminated
    refused.close()

    other = Peer(gateway, other_cert, other_key, root)
    other_response = other.tunnel(target)
    other.close()

    first, stream = peers[0]
    held_tunnel = first.get(stream, target)
    held_new_stream = first.tunnel(target)
    for peer, _ in peers:
        peer.close()

    print(
        json.dumps(
            {
                "refused": {
                    "goaway": None if goaway is None else int(goaway.error_code),
                    "debug": None
                    if goaway is None
                    else (goaway.additional_data or b"").decode(errors="replace"),
                    "status": status,
                },
                "other": other_response,
                "held_tunnel": held_tunnel,
                "held_new_stream": held_new_stream,
            }
        )
    )


if __name__ == "__main__":
    main()
