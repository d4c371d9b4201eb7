#!/usr/bin/env python3
"""Generates kvq-dashboard.json, the Grafana dashboard for kvq (store + worker).

The JSON is committed; this script is its source (layout and queries in one readable place).
  python3 deploy/grafana/make_dashboard.py            # rewrite kvq-dashboard.json
  python3 deploy/grafana/make_dashboard.py --check    # exit 1 if the committed JSON is stale
Import the JSON in Grafana (Dashboards > New > Import) and pick the Prometheus data source.
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).with_name("kvq-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
STORE = 'namespace=~"$namespace", pod=~"$store"'
WORKER = 'namespace=~"$namespace", pod=~"$worker"'
RATE = "$__rate_interval"


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to new rows."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def add(self, panel, w, h):
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        panel["datasource"] = DS
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title, desc, unit, targets, stack=False, overrides=None):
    refs = "ABCDEFGHIJ"
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "targets": [target(e, l, refs[i]) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                           "showPoints": "never", "spanNulls": False},
            },
            "overrides": overrides or [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title, desc, unit, expr, decimals=1, thresholds=None):
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "targets": [target(expr, title, "A")],
        "fieldConfig": {"defaults": {
            "unit": unit, "decimals": decimals,
            "thresholds": {"mode": "absolute",
                           "steps": thresholds or [{"color": "blue", "value": None}]},
        }, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def quantiles(metric, sel, by, qs=(0.5, 0.99)):
    """p50/p99 of a histogram, one series per `by` label (or one overall series)."""
    out = []
    for q in qs:
        group = f"{by}, le" if by else "le"
        legend = f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append((f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
                    legend))
    return out


def build():
    L = Layout()

    L.row("Memory: what the quantized KV cache saves")
    L.add(stat("Memory saved", "1 - stored bytes / fp16-equivalent bytes, over the selected stores: "
               "the share of KV-cache memory the quantization saves against an fp16 cache. Negative while "
               "sessions are shorter than their full-precision sink + window (nothing quantized yet, and "
               "pages are allocated whole).",
               "percentunit",
               f"1 - sum(kvq_store_bytes{{{STORE}}}) / sum(kvq_store_fp16_equivalent_bytes{{{STORE}}})",
               thresholds=[{"color": "red", "value": None}, {"color": "yellow", "value": 0.5},
                           {"color": "green", "value": 0.75}]), 4, 6)
    L.add(stat("Compression ratio", "fp16-equivalent bytes / stored bytes (all kinds).", "suffix:x",
               f"sum(kvq_store_fp16_equivalent_bytes{{{STORE}}}) / sum(kvq_store_bytes{{{STORE}}})"), 4, 6)
    L.add(stat("Sessions", "Sessions held by the selected stores.", "short",
               f"sum(kvq_store_sessions{{{STORE}}})", decimals=0), 4, 6)
    L.add(stat("Tokens held", "Tokens held by the selected stores (sum over sessions of each session's length).",
               "short", f"sum(kvq_store_tokens{{{STORE}}})", decimals=0), 4, 6)
    L.add(stat("Pool used", "Page pool used / total over the selected stores.", "percentunit",
               f'sum(kvq_store_pool_bytes{{{STORE}, state="used"}}) / sum(kvq_store_pool_bytes{{{STORE}}})',
               thresholds=[{"color": "green", "value": None}, {"color": "yellow", "value": 0.8},
                           {"color": "red", "value": 0.95}]), 4, 6)
    L.add(stat("Generated tokens/s", "Tokens generated per second by the selected workers.", "short",
               f"sum(rate(kvq_worker_generated_tokens_total{{{WORKER}}}[{RATE}]))"), 4, 6)

    L.add(timeseries(
        "Stored bytes by kind vs fp16-equivalent",
        "Stacked: what the caches take, by kind (codes, scales, full_precision sink/window, metadata). "
        "Line: what the same tokens would take as fp16 K and V. The gap is the memory saved.",
        "bytes",
        [(f"sum by (kind) (kvq_store_bytes{{{STORE}}})", "{{kind}}"),
         (f"sum(kvq_store_fp16_equivalent_bytes{{{STORE}}})", "fp16 equivalent")],
        stack=True,
        overrides=[{"matcher": {"id": "byName", "options": "fp16 equivalent"},
                    "properties": [{"id": "custom.stacking", "value": {"mode": "none", "group": "B"}},
                                   {"id": "custom.fillOpacity", "value": 0},
                                   {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                   {"id": "custom.lineWidth", "value": 2}]}]), 12, 8)
    L.add(timeseries("Pool used / free", "The page pool each store allocated at start-up.", "bytes",
                     [(f"sum by (state) (kvq_store_pool_bytes{{{STORE}}})", "{{state}}")], stack=True), 12, 8)

    L.row("Sessions")
    L.add(timeseries("Sessions per store", "", "short",
                     [(f"sum by (pod) (kvq_store_sessions{{{STORE}}})", "{{pod}}")]), 12, 8)
    L.add(timeseries("Tokens held per store", "", "short",
                     [(f"sum by (pod) (kvq_store_tokens{{{STORE}}})", "{{pod}}")]), 12, 8)

    L.row("Attend (store)")
    L.add(timeseries("Attend latency p50 / p99 by phase",
                     "One Attend request (one layer, a batch of sessions) from arrival to answer.", "s",
                     quantiles("kvq_store_attend_seconds", STORE, "phase")), 12, 8)
    L.add(timeseries("Attended tokens/s", "New tokens appended and attended per second (all layers).",
                     "short",
                     [(f"sum by (pod) (rate(kvq_store_attended_tokens_total{{{STORE}}}[{RATE}]))", "{{pod}}")]),
          12, 8)
    L.add(timeseries("Batch size (entries per Attend)",
                     "Sessions served by one kernel launch: larger is more efficient.", "short",
                     quantiles("kvq_store_batch_entries", STORE, None) +
                     [(f"sum(rate(kvq_store_batch_entries_sum{{{STORE}}}[{RATE}])) / "
                       f"sum(rate(kvq_store_batch_entries_count{{{STORE}}}[{RATE}]))", "mean")]), 8, 8)
    L.add(timeseries("Kernel time p50 / p99", "Time in the backend's kernels per batched call.", "s",
                     quantiles("kvq_store_kernel_seconds", STORE, None)), 8, 8)
    L.add(timeseries("Errors by code", "Failed requests or entries per second, by gRPC status code; "
                     "quota rejections are RESOURCE_EXHAUSTED.", "reqps",
                     [(f"sum by (code) (rate(kvq_store_errors_total{{{STORE}}}[{RATE}]))", "{{code}}"),
                      (f"sum(rate(kvq_store_quota_rejections_total{{{STORE}}}[{RATE}]))", "quota rejections")]),
          8, 8)

    L.row("Worker")
    L.add(timeseries("Worker tokens/s", "Tokens generated per second, per worker.", "short",
                     [(f"sum by (pod) (rate(kvq_worker_generated_tokens_total{{{WORKER}}}[{RATE}]))", "{{pod}}"),
                      (f"sum(rate(kvq_worker_generated_tokens_total{{{WORKER}}}[{RATE}]))", "total")]), 12, 8)
    L.add(timeseries("Requests/s by result, requests in flight", "Generate requests finishing per second "
                     "by result (ok, error, cancelled); in flight: queued or running.", "short",
                     [(f"sum by (result) (rate(kvq_worker_requests_total{{{WORKER}}}[{RATE}]))", "{{result}}/s"),
                      (f"sum(kvq_worker_in_flight_requests{{{WORKER}}})", "in flight")]), 12, 8)
    L.add(timeseries("Time to first token p50 / p99", "From a Generate request to its first token.", "s",
                     quantiles("kvq_worker_time_to_first_token_seconds", WORKER, None)), 8, 8)
    L.add(timeseries("Inter-token latency p50 / p99", "Between consecutive tokens of one stream.", "s",
                     quantiles("kvq_worker_inter_token_latency_seconds", WORKER, None)), 8, 8)
    L.add(timeseries("Store round trip p50 / p99", "One layer's Attend message, worker to store and back.",
                     "s", quantiles("kvq_worker_store_round_trip_seconds", WORKER, None)), 8, 8)
    L.add(timeseries("Worker batch: sequences per step",
                     "Sequences decoded together in one forward step (continuous batching).", "short",
                     quantiles("kvq_worker_step_sequences", WORKER, None) +
                     [(f"sum(rate(kvq_worker_step_sequences_sum{{{WORKER}}}[{RATE}])) / "
                       f"sum(rate(kvq_worker_step_sequences_count{{{WORKER}}}[{RATE}]))", "mean")]), 12, 8)
    L.add(timeseries("Step duration p50 / p99", "One batched forward step over all layers.", "s",
                     quantiles("kvq_worker_step_duration_seconds", WORKER, None)), 12, 8)

    def var(name, label, query):
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return {
        "uid": "kvq-overview",
        "title": "kvq: quantized KV-cache store",
        "description": "Memory saved, sessions, Attend latency and throughput of the kvq stores; "
                       "generation metrics of the workers. Generated by deploy/grafana/make_dashboard.py.",
        "tags": ["kvq", "llm-serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            var("namespace", "Namespace", "label_values(kvq_store_sessions, namespace)"),
            var("store", "Store", 'label_values(kvq_store_sessions{namespace=~"$namespace"}, pod)'),
            var("worker", "Worker", 'label_values(kvq_worker_in_flight_requests{namespace=~"$namespace"}, pod)'),
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": L.panels,
    }


def main():
    text = json.dumps(build(), indent=2, sort_keys=False) + "\n"
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 {pathlib.Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
