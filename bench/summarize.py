#!/usr/bin/env python3
"""Turn the benchmark's results log into a Markdown report (standard library only).

    python3 bench/summarize.py RESULTS_LOG > report.md

RESULTS_LOG is written by bench/run.sh, one measurement a line, as key=value words:

    META key=value ...
    WRK round=1 scenario=small target=nginx requests=... rps=... p50_us=... p90_us=... p99_us=...
        err_*=... cpu_us=... backend_cpu_us=... preempted=...
    RSS target=backstop state=idle|conns|twice|peak rss_kb=... open=... connections=... ok=...

For every scenario and target the report gives the median over rounds of req/s, p50, p90 and
p99 latency, req/s and p99 as a ratio to nginx, the proxy's CPU time per request
(user + system, from /proc; less sensitive to a noisy host than req/s), the backend's
(what the proxy's upstream requests cost it: more headers, more parsing) and how often the
kernel preempted the proxy, per 100 requests (pinned: the backend on the same core run in
between; fewer turns mean bigger batches for the backend and a wider spread of latency).
"""

import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "nginx-fwd", "haproxy", "bare", "pool", "backstop", "backstop-pgo"]
LABELS = {
    "direct": "backend direct (no proxy)",
    "nginx": "nginx",
    "nginx-fwd": "nginx + Backstop's headers (X-Forwarded-*, Forwarded, request id)",
    "haproxy": "HAProxy",
    "bare": "bare hyper-util proxy",
    "pool": "bare proxy, own HTTP/1 pool",
    "backstop": "**Backstop**",
    "backstop-pgo": "**Backstop, PGO build** (`scripts/build-pgo.sh`)",
}
SCENARIOS = {"small": "GET /bench/small (13 B body)", "16k": "GET /bench/16k (16 KiB body)"}
BASELINE = "nginx"


def parse(path):
    meta, wrk, rss = {}, [], {}
    with open(path) as f:
        for line in f:
            kind, *words = line.split()
            fields = dict(w.split("=", 1) for w in words if "=" in w)
            if kind == "META":
                meta.update(fields)
            elif kind == "WRK":
                wrk.append(fields)
            elif kind == "RSS":
                rss[(fields["target"], fields["state"])] = fields
    return meta, wrk, rss


def fmt_ms(us):
    ms = us / 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def fmt_ratio(x, base):
    return f"{x / base:.2f}×" if base else "n/a"


def fmt_mib(kb):
    return f"{int(kb) / 1024:.1f} MiB"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    meta, wrk, rss = parse(sys.argv[1])

    runs = defaultdict(list)  # (scenario, target) -> list of runs
    for r in wrk:
        runs[(r["scenario"], r["target"])].append(r)

    def median(scenario, target, key):
        vals = [float(r[key]) for r in runs[(scenario, target)]]
        return statistics.median(vals) if vals else None

    def per_request(scenario, target, key, scale=1, digits=1):
        vals = [float(r[key]) * scale / float(r["requests"]) for r in runs[(scenario, target)]
                if key in r and float(r["requests"]) > 0]
        return f"{statistics.median(vals):.{digits}f}" if vals else "—"

    def latency(scenario, target, key):
        value = median(scenario, target, key) if all(
            key in r for r in runs[(scenario, target)]) else None
        return fmt_ms(value) if value is not None else "—"

    def errors(scenario, target):
        return sum(int(r[k]) for r in runs[(scenario, target)] for k in r if k.startswith("err_"))

    warmup = meta.get("warmup", "?")
    warmup = "no warm-up" if warmup == "0" else f"after a {warmup} warm-up"
    out = []
    w = out.append
    w(f"# Backstop benchmark — {meta.get('date', '?')}")
    w("")
    w(f"- Host: {meta.get('cpu', '?').replace('_', ' ')}, {meta.get('cores', '?')} cores, "
      f"Linux {meta.get('kernel', '?')}")
    w(f"- Versions: Backstop {meta.get('backstop', '?')}, nginx {meta.get('nginx', '?')}, "
      f"HAProxy {meta.get('haproxy', '?')}, wrk {meta.get('wrk', '?')}")
    w(f"- Load: `wrk -t1 -c{meta.get('connections', '?')} -d{meta.get('duration', '?')} --latency` "
      f"on 127.0.0.1, {meta.get('rounds', '?')} interleaved round(s), {warmup}; "
      "every number is the median over rounds. "
      f"CPU pinning: {'wrk on CPU 0, servers on CPU 1' if meta.get('pin') == '1' else 'none'}.")
    w("- Each proxy runs one worker (nginx `worker_processes 1`, HAProxy `nbthread 1`, "
      "Backstop `workers = 1`) in front of the same backend, with upstream keep-alive.")
    w("")

    for scenario, title in SCENARIOS.items():
        if not any(runs[(scenario, t)] for t in TARGETS):
            continue
        base_rps = median(scenario, BASELINE, "rps")
        base_p99 = median(scenario, BASELINE, "p99_us")
        w(f"## {title}")
        w("")
        w("| target | req/s | req/s vs nginx | p50 | p90 | p99 | p99 vs nginx | CPU µs/req "
          "| backend CPU µs/req | preempted /100 req | errors |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in TARGETS:
            if not runs[(scenario, t)]:
                continue
            rps = median(scenario, t, "rps")
            p50 = median(scenario, t, "p50_us")
            p99 = median(scenario, t, "p99_us")
            w(f"| {LABELS[t]} | {rps:,.0f} | {fmt_ratio(rps, base_rps)} | {fmt_ms(p50)} | "
              f"{latency(scenario, t, 'p90_us')} | "
              f"{fmt_ms(p99)} | {fmt_ratio(p99, base_p99)} | {per_request(scenario, t, 'cpu_us')} | "
              f"{per_request(scenario, t, 'backend_cpu_us')} | "
              f"{per_request(scenario, t, 'preempted', scale=100, digits=0)} | "
              f"{errors(scenario, t)} |")
        w("")

    # Each round's ratio to nginx in that same round: the host's slow and
    # fast spells hit both sides of a pair alike.
    paired = [t for t in ("backstop", "backstop-pgo") if any(runs[(s, t)] for s in SCENARIOS)]
    if paired:
        w("## Round by round: each Backstop run ÷ the nginx run of the same round")
        w("")
        w("| target | scenario | req/s ratio, median (min–max) | p99 ratio, median (min–max) |")
        w("|---|---|---:|---:|")
        for t in paired:
            for scenario in SCENARIOS:
                base = {r["round"]: r for r in runs[(scenario, BASELINE)]}
                pairs = [(r, base[r["round"]]) for r in runs[(scenario, t)] if r["round"] in base]
                if not pairs:
                    continue
                cells = []
                for key in ("rps", "p99_us"):
                    ratios = [float(r[key]) / float(b[key]) for r, b in pairs if float(b[key])]
                    cells.append(f"{statistics.median(ratios):.2f}× "
                                 f"({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "n/a")
                w(f"| {LABELS[t]} | {scenario} | {cells[0]} | {cells[1]} |")
        w("")

    if rss:
        n = meta.get("idle_conns", "1000")
        w("## Memory (resident set size)")
        w("")
        w(f"| proxy | idle after start | with {int(n):,} idle keep-alive connections | "
          "connections still open | with 2 × that, the first half idle for 10 s | "
          "peak over the run (VmHWM) |")
        w("|---|---:|---:|---:|---:|---:|")
        for t in ("nginx", "haproxy", "backstop"):
            idle, conns, twice, peak = (
                rss.get((t, s)) for s in ("idle", "conns", "twice", "peak"))
            if not (idle or conns or twice or peak):
                continue
            w(f"| {LABELS[t]} | {fmt_mib(idle['rss_kb']) if idle else '—'} | "
              f"{fmt_mib(conns['rss_kb']) if conns else '—'} | "
              f"{conns['open'] + '/' + conns['connections'] if conns else '—'} | "
              f"{fmt_mib(twice['rss_kb']) if twice else '—'} | "
              f"{fmt_mib(peak['rss_kb']) if peak else '—'} |")
        w("")
        w("VmRSS from /proc/PID/status; nginx is master + worker summed. The connections each "
          "sent one `GET /health` (answered by the proxy itself) and then stayed idle. "
          "The 2 × column opens a second batch while the first is still open and has been "
          "idle for about 10 s; its RSS is read with both batches open.")
        w("")

    w("## Every run")
    w("")
    w("| round | scenario | target | req/s | p50 | p99 | CPU µs/req | errors |")
    w("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(wrk, key=lambda r: (int(r["round"]), list(SCENARIOS).index(r["scenario"]),
                                        TARGETS.index(r["target"]))):
        errs = sum(int(r[k]) for k in r if k.startswith("err_"))
        cpu = float(r.get("cpu_us", "nan")) / max(float(r["requests"]), 1)
        w(f"| {r['round']} | {r['scenario']} | {r['target']} | {float(r['rps']):,.0f} | "
          f"{fmt_ms(float(r['p50_us']))} | {fmt_ms(float(r['p99_us']))} | {cpu:.1f} | {errs} |")
    w("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
