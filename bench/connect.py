"""Full MQTT-over-mTLS connects for bench/connect.sh: THREADS threads share the devices of
DEVDIR (one sub-directory per serial, as `tms-gateway device cert --out` writes it), each
device connecting once: TCP connect, TLS 1.3 handshake with the device's certificate (the
server checked against the CA in the device's directory, server name localhost), MQTT 3.1.1
CONNECT (client id = serial, clean session, keep-alive 60), CONNACK read and checked (return
code 0), DISCONNECT, close. No session is resumed: every connect is a full handshake.

Usage: connect.py PORT DEVDIR THREADS LATFILE
Appends each successful connect's latency (µs, from TCP connect to the CONNACK read) to
LATFILE, one per line; prints "<connects> <failures> <wall seconds>" on stdout and the
first few failures on stderr.
"""

import os
import socket
import ssl
import sys
import threading
import time

TIMEOUT_S = 10


def context(devdir, serial):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(os.path.join(devdir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(devdir, serial + ".pem"), os.path.join(devdir, serial + ".key"))
    return ctx


def mqtt_connect(serial):
    cid = serial.encode()
    # Variable header: protocol name, level 4 (3.1.1), flags (clean session), keep-alive 60 s.
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128, "one-byte remaining length"
    return bytes([0x10, len(body)]) + body


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} CONNACK bytes")
        buf += chunk
    return buf


def connect_once(port, ctx, serial):
    t0 = time.perf_counter()
    # The outer `with` closes the TCP socket when the handshake fails (wrap_socket detaches
    # it when it succeeds, and the inner one closes it then).
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            if tls.version() != "TLSv1.3":
                raise ssl.SSLError(f"negotiated {tls.version()}")
            tls.sendall(mqtt_connect(serial))
            connack = read_exact(tls, 4)
            if connack[0] != 0x20 or connack[1] != 2 or connack[3] != 0:
                raise ConnectionError(f"CONNACK {connack.hex()}")
            latency = time.perf_counter() - t0
            tls.sendall(b"\xe0\x00")
    return latency


def main():
    port, devdir, threads, latfile = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    serials = sorted(os.listdir(devdir))
    # Certificates loaded before the first connect: the client's file I/O is not connect time.
    work = [(s, context(os.path.join(devdir, s), s)) for s in serials]
    lock = threading.Lock()
    latencies, failures = [], []

    def worker():
        while True:
            with lock:
                if not work:
                    return
                serial, ctx = work.pop()
            try:
                lat = connect_once(port, ctx, serial)
                with lock:
                    latencies.append(lat)
            except (OSError, ValueError) as e:  # ssl.SSLError and socket errors are OSErrors
                with lock:
                    failures.append(f"{serial}: {e!r}")

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    with open(latfile, "a") as f:
        f.writelines(f"{lat * 1e6:.0f}\n" for lat in latencies)
    for line in failures[:5]:
        print(line, file=sys.stderr)
    print(f"{len(serials)} {len(failures)} {wall:.3f}")


if __name__ == "__main__":
    main()
