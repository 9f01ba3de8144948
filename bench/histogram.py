"""Quantiles of a Prometheus histogram in a /metrics text, interpolated within a bucket as
Prometheus' histogram_quantile() does. Shared by the bench/ harnesses.

usage: histogram.py METRICS_FILE NAME    prints {"count": N, "p50_ms": ..., "p99_ms": ...}
"""
import json
import sys


def read(text, name):
    """The (upper bound, cumulative count) buckets of histogram `name`, and its count."""
    buckets, count = [], 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
    return sorted(buckets), count


def quantile(buckets, count, q):
    target, prev_le, prev_c = q * count, 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((target - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return float("nan")


def summary_ms(text, name):
    """Count, p50 and p99 in milliseconds of a histogram in seconds."""
    buckets, count = read(text, name)
    return {"count": int(count),
            "p50_ms": round(quantile(buckets, count, 0.5) * 1000, 1),
            "p99_ms": round(quantile(buckets, count, 0.99) * 1000, 1)}


if __name__ == "__main__":
    print(json.dumps(summary_ms(open(sys.argv[1]).read(), sys.argv[2])))
