"""One publisher of the latency benchmark (bench/latency.sh): QoS 1 at a fixed rate, open
loop (message i leaves at start + i/rate whatever the acks do), timing each PUBLISH → PUBACK.
Prints one JSON line: sent, acked and the latencies in microseconds (sorted).

usage: latency.py HOST PORT DIR SERIAL RATE SECONDS
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, folder, serial = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rate, seconds = float(sys.argv[5]), float(sys.argv[6])
payload = '{"mode":"online","load_pct":42,"battery":{"charge_pct":100,"runtime_min":40},"input":{"voltage":229.8,"frequency_hz":50}}'

sent_at, latencies, lock = {}, [], threading.Lock()
connected = threading.Event()


def on_connect(client, userdata, flags, reason, properties):
    if not reason.is_failure:
        connected.set()


acked_at = {}  # PUBACKs that arrived before publish() returned the message id


def on_publish(client, userdata, mid, reason, properties):
    now = time.perf_counter()
    with lock:
        t = sent_at.pop(mid, None)
        if t is None:
            acked_at[mid] = now
    if t is not None:
        latencies.append((now - t) * 1e6)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=serial, protocol=mqtt.MQTTv311)
client.tls_set(ca_certs=f"{folder}/ca.pem", certfile=f"{folder}/{serial}.pem", keyfile=f"{folder}/{serial}.key")
client.max_inflight_messages_set(65000)
client.max_queued_messages_set(0)
client.on_connect, client.on_publish = on_connect, on_publish
client.connect(host, port, keepalive=60)
client.loop_start()
if not connected.wait(10):
    sys.exit(f"{serial}: no CONNACK")

topic = f"tms/{serial}/telemetry"
total = int(rate * seconds)
start = time.perf_counter()
for i in range(total):
    due = start + i / rate
    delay = due - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    # paho's own locks are taken inside publish(): ours is never held across it.
    t = time.perf_counter()
    info = client.publish(topic, payload, qos=1)
    with lock:
        early = acked_at.pop(info.mid, None)
        if early is None:
            sent_at[info.mid] = t
    if early is not None:
        latencies.append((early - t) * 1e6)
deadline = time.perf_counter() + 10
while sent_at and time.perf_counter() < deadline:
    time.sleep(0.01)
client.disconnect()
client.loop_stop()
print(json.dumps({"serial": serial, "sent": total, "acked": len(latencies), "late_s": round(time.perf_counter() - start - seconds, 2), "us": sorted(latencies)}))
