"""The agent's metrics, rendered in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with ``prometheus_client``: measured here, recording
one request costs 0.7 us by hand and 2.2 us through the library, whose import
alone takes about 80 ms; the format is a few lines. Names:

``lap_pkcs11_agent_requests_total{outcome,protocol}``
    Requests answered, by outcome (``OK`` or the error name) and protocol
    (``lap1``: ``lap-pkcs11 client``; ``line``: the gateway's line protocol,
    e.g. through socat; ``metrics``).
``lap_pkcs11_agent_service_seconds``
    Histogram of the time from a request's last byte received to its answer sent.
``lap_pkcs11_agent_connections``
    Connections open now.
``lap_pkcs11_agent_connections_dropped_total{reason}``
    Connections closed unanswered: ``peer`` (uid/gid not allowed), ``limit``
    (``--max-connections`` reached), ``idle`` (no complete request in time).
``lap_pkcs11_agent_logins_total``
    C_Login calls: one at start, one per recovery attempt, never more.
``lap_pkcs11_agent_recoveries_total{result}``
    Recovery attempts, ``ok`` or ``failed``.
``lap_pkcs11_agent_token_state{state}``
    1 for the session's current state (ready, lost, recovering, gone, refused,
    closed), 0 for the others.
``lap_pkcs11_agent_workers``, ``lap_pkcs11_agent_workers_busy``
    The worker pool's size and how many workers are signing now.
``lap_pkcs11_agent_start_time_seconds``
    When the agent started (Unix time).
"""

import bisect
import threading
import time

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5)
STATES = ("ready", "lost", "recovering", "gone", "refused", "closed")
PREFIX = "lap_pkcs11_agent_"


class Metrics:
    """Counters, gauges and one histogram; every update takes one lock briefly."""

    def __init__(self, workers):
        self._lock = threading.Lock()
        self.requests = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds_sum = 0.0
        self.connections = 0
        self.dropped = {"peer": 0, "limit": 0, "idle": 0}
        self.logins = 0
        self.recoveries = {"ok": 0, "failed": 0}
        self.state = "closed"
        self.workers = workers
        self.busy = 0
        self.started = time.time()

    def request(self, outcome, protocol, seconds):
        with self._lock:
            key = (outcome, protocol)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.seconds_sum += seconds

    def opened(self):
        with self._lock:
            self.connections += 1
            return self.connections

    def closed(self):
        with self._lock:
            self.connections -= 1

    def drop(self, reason):
        with self._lock:
            self.dropped[reason] += 1

    def login(self):
        with self._lock:
            self.logins += 1

    def recovery(self, result):
        with self._lock:
            self.recoveries[result] += 1

    def working(self, delta):
        with self._lock:
            self.busy += delta

    def render(self):
        """The exposition text, one snapshot under the lock."""
        with self._lock:
            out = []

            def family(name, kind, text):
                out.append(f"# HELP {PREFIX}{name} {text}")
                out.append(f"# TYPE {PREFIX}{name} {kind}")

            family("requests_total", "counter", "Requests answered, by outcome and protocol.")
            for (outcome, protocol), count in sorted(self.requests.items()):
                out.append(f'{PREFIX}requests_total{{outcome="{outcome}",protocol="{protocol}"}} '
                           f"{count}")
            family("service_seconds", "histogram",
                   "Time from a request's last byte received to its answer sent.")
            running = 0
            for bound, count in zip(BUCKETS, self.buckets):
                running += count
                out.append(f'{PREFIX}service_seconds_bucket{{le="{bound:g}"}} {running}')
            running += self.buckets[-1]
            out.append(f'{PREFIX}service_seconds_bucket{{le="+Inf"}} {running}')
            out.append(f"{PREFIX}service_seconds_sum {self.seconds_sum:.6f}")
            out.append(f"{PREFIX}service_seconds_count {running}")
            family("connections", "gauge", "Connections open now.")
            out.append(f"{PREFIX}connections {self.connections}")
            family("connections_dropped_total", "counter",
                   "Connections closed unanswered, by reason (peer, limit, idle).")
            for reason, count in self.dropped.items():
                out.append(f'{PREFIX}connections_dropped_total{{reason="{reason}"}} {count}')
            family("logins_total", "counter", "C_Login calls (one at start, one per recovery "
                                              "attempt).")
            out.append(f"{PREFIX}logins_total {self.logins}")
            family("recoveries_total", "counter", "Recovery attempts, by result.")
            for result, count in self.recoveries.items():
                out.append(f'{PREFIX}recoveries_total{{result="{result}"}} {count}')
            family("token_state", "gauge", "1 for the token session's current state.")
            for state in STATES:
                out.append(f'{PREFIX}token_state{{state="{state}"}} '
                           f"{int(state == self.state)}")
            family("workers", "gauge", "Worker threads, each with its own PKCS#11 session.")
            out.append(f"{PREFIX}workers {self.workers}")
            family("workers_busy", "gauge", "Workers signing now.")
            out.append(f"{PREFIX}workers_busy {self.busy}")
            family("start_time_seconds", "gauge", "Start time of the agent (Unix time).")
            out.append(f"{PREFIX}start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"
