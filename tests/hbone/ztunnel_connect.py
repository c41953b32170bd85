"""An HBONE client shaped as ztunnel's: mutual TLS 1.3 with ALPN h2, then one HTTP/2
CONNECT carrying the three headers ztunnel's outbound path sends (`baggage`, `forwarded`,
`traceparent`), then an HTTP/1.1 request through the tunnel. Written with the `h2`
package, an HTTP/2 implementation independent of ambit's (hyper/h2 in Rust), so the test
shows that a peer other than ambit is understood.

Usage: ztunnel_connect.py GATEWAY_IP:PORT TARGET_IP:PORT CERT KEY ROOT BAGGAGE FORWARDED
       TRACEPARENT
Prints one JSON line: the CONNECT's status and, on 200, the tunnelled HTTP response.
"""

import json
import ssl
import sys

import h2.config
import h2.connection
import h2.events

import mesh_tls


def main():
    gateway, target, cert, key, root, baggage, forwarded, traceparent = sys.argv[1:9]
    raw, tls = mesh_tls.connect(gateway, cert, key, root)

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    # The pseudo-headers of a CONNECT are :method and :authority alone (RFC 9113 8.5).
    conn.send_headers(
        stream,
        [
            (":method", "CONNECT"),
            (":authority", target),
            ("baggage", baggage),
            ("forwarded", forwarded),
            ("traceparent", traceparent),
        ],
    )
    tls.sendall(conn.data_to_send())

    status, body, ended = None, b"", False
    sent_request = False
    while not ended:
        data = tls.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                if status != 200:
                    ended = True
                elif not sent_request:
                    request = f"GET /ip HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
                    # Not half-closed: the application closes after its answer (`Connection: close`).
                    conn.send_data(stream, request.encode())
                    sent_request = True
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded):
                # The application is done: end our half too, as a client whose application
                # closes does.
                conn.end_stream(stream)
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                ended = True
        tls.sendall(conn.data_to_send())
    # Orderly: GOAWAY, then TLS close_notify.
    conn.close_connection()
    tls.sendall(conn.data_to_send())
    try:
        tls.unwrap()
    except (OSError, ssl.SSLError):
        pass  # the server may close first; our close_notify is sent either way
    raw.close()
    print(json.dumps({"status": status, "response": body.decode(errors="replace")}))


if __name__ == "__main__":
    main()
