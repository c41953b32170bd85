#!/usr/bin/env python3
"""A gRPC echo server and client for the test bed, over h2c (no TLS).

Service `ambit.test.Echo`, methods `Say` and `Admin`: both answer the request's bytes.
Generic handlers with identity (bytes) serializers, so no protoc or generated code.

  echo.py serve PORT
      Listens on [::]:PORT and 0.0.0.0:PORT and logs one line per call it receives,
      `GRPC /ambit.test.Echo/<Method>` (unknown methods too), on stdout.
  echo.py call HOST:PORT METHOD [--metadata k=v]... [--message TEXT]
      Calls /ambit.test.Echo/METHOD and prints `OK <reply>` or
      `STATUS <StatusCode name> <details>`; exits 0 either way, 2 on usage errors.
"""

import argparse
import sys
from concurrent import futures

import grpc

SERVICE = "ambit.test.Echo"
METHODS = ("Say", "Admin")
# As curl's --max-time in the test bed: a call the mesh swallows ends as DEADLINE_EXCEEDED.
CALL_TIMEOUT_SECONDS = 3
# No proxy from the environment: the call must go where the test says, through the mesh.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class LogCalls(grpc.ServerInterceptor):
    """Logs every call before dispatch, so calls to unknown methods show up too."""

    def intercept_service(self, continuation, handler_call_details):
        # Flushed per line: stdout is a file the test reads while the server runs.
        print(f"GRPC {handler_call_details.method}", flush=True)
        return continuation(handler_call_details)


def echo(request, _context):
    return request


def serve(port):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=[LogCalls()]
    )
    handlers = {m: grpc.unary_unary_rpc_method_handler(echo) for m in METHODS}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, handlers),)
    )
    bound = 0
    # gRPC's [::] is dual-stack where the kernel allows; 0.0.0.0 (sharing the port with
    # SO_REUSEPORT) still serves IPv4 where IPv6 is off. One of the two must bind.
    for address in (f"[::]:{port}", f"0.0.0.0:{port}"):
        try:
            if server.add_insecure_port(address):
                bound += 1
        except RuntimeError:
            pass
    if not bound:
        sys.exit(f"echo.py: cannot listen on port {port}")
    server.start()
    server.wait_for_termination()


def call(target, method, metadata, message):
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            reply = stub(
                message.encode(), metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            print(f"STATUS {error.code().name} {error.details() or ''}".rstrip())
            return
    print(f"OK {reply.decode(errors='replace')}")


def metadata_pair(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected k=v, got {text!r}")
    # gRPC accepts only lowercase keys; headers are case-insensitive anyway.
    return (key.lower(), value)


def main():
    # argparse exits 2 on usage errors.
    parser = argparse.ArgumentParser(prog="echo.py")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve")
    serve_parser.add_argument("port", type=int)
    call_parser = commands.add_parser("call")
    call_parser.add_argument("target", help="HOST:PORT")
    call_parser.add_argument("method", help="Say, Admin or any other name")
    call_parser.add_argument(
        "--metadata", type=metadata_pair, action="append", default=[]
    )
    call_parser.add_argument("--message", default="hello")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port)
    else:
        call(args.target, args.method, args.metadata, args.message)


if __name__ == "__main__":
    main()
