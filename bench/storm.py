"""The two halves of bench/storm.sh.

usage: storm.py watch N METRICS_URL SIM_LOG SIM_PID
           waits for `simulate --storm` (process SIM_PID) to release its devices (a line in
           SIM_LOG), then polls METRICS_URL until the store has N devices online
           (tms_devices{state="online"}); prints {"all_online_secs": S or null, "most_online":
           M}. Gives up when the simulator has exited or nothing has changed for 60 s.
       storm.py report N METRICS_FILE SIM_OUT WATCH_JSON
           appends one JSON line to bench/results/storm.jsonl and prints it.
"""
import datetime
import json
import os
import sys
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from histogram import summary_ms  # noqa: E402

PATIENCE = 60.0


def online(url):
    try:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('tms_devices{state="online"}'):
            return int(float(line.split()[-1]))
    return 0


def running(pid):
    """Whether process `pid` is still running (an exited child of the shell is a zombie)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def released_at(sim_log):
    """When the simulator let its devices go (Unix seconds), once it has said so."""
    for line in open(sim_log):
        if " devices released at " in line:
            return int(line.split()[-1]) / 1000
    return None


def watch(n, url, sim_log, pid):
    while (released := released_at(sim_log)) is None:
        if not running(pid):
            return {"all_online_secs": None, "most_online": 0}
        time.sleep(0.05)
    last_change = time.monotonic()
    most = 0
    while time.monotonic() - last_change < PATIENCE and running(pid):
        now = online(url)
        if now is not None and now > most:
            most, last_change = now, time.monotonic()
        if most >= n:
            return {"all_online_secs": round(time.time() - released, 2), "most_online": most}
        time.sleep(0.1)
    return {"all_online_secs": None, "most_online": most}


def report(n, metrics_file, sim_out, watch_json):
    out = open(sim_out).read().strip().splitlines()
    storm = next((json.loads(l[len("storm: "):]) for l in out if l.startswith("storm: ")), {})
    summary = next((l for l in out if l.startswith("simulated ")), "")
    latency = summary_ms(open(metrics_file).read(), "tms_presence_online_latency_seconds")
    watched = json.load(open(watch_json))
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "devices": n, "connected_sessions_measured": latency["count"],
           "online_latency_p50_ms": latency["p50_ms"], "online_latency_p99_ms": latency["p99_ms"],
           "all_online_secs": watched["all_online_secs"], "most_online": watched["most_online"],
           "all_connected_secs": storm.get("all_connected_secs"),
           "connect_timeouts": storm.get("connect_timeouts"), "reconnects": storm.get("reconnects"),
           "simulate": summary}
    open("bench/results/storm.jsonl", "a").write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        print(json.dumps(watch(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        report(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
