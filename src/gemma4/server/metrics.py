"""/metrics: Prometheus metrics named as vLLM's `vllm:*` ones with the prefix `gemma4:` (a Grafana dashboard made
for vLLM needs only the prefix changed), each labelled with `model_name`, through prometheus_client.

Engine state (requests running and waiting, K/V use, preemptions, prefix-cache hits, drafts) is read from the
engine at each scrape; per-request latencies and sizes are histograms observed as requests run."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that dashboards' quantile panels read the same.
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0)
ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
           960.0, 1920.0, 7680.0)
TOKENS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))


class Metrics:
    def __init__(self, service):
        self.service, name = service, service.model_name
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]

        def hist(metric, text, buckets):
            return Histogram(f"gemma4:{metric}", text, labels, buckets=buckets, registry=r).labels(name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token, from the request's arrival.", TTFT)
        self.itl = hist("inter_token_latency_seconds", "Time between two tokens of a request.", ITL)
        self.e2e = hist("e2e_request_latency_seconds", "Time from a request's arrival to its last token.", LATENCY)
        self.queue = hist("request_queue_time_seconds", "Time a request waited for the engine to schedule it.",
                          LATENCY)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens of each finished request.", TOKENS)
        self.generation_tokens = hist("request_generation_tokens", "Tokens generated for each finished request.",
                                      TOKENS)
        self.success = Counter("gemma4:request_success", "Requests finished, by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        r.register(_EngineState(service))

    def finished(self, reason: str, prompt: int, generated: int, elapsed: float) -> None:
        self.success.labels(self.service.model_name, reason).inc()
        self.prompt_tokens.observe(prompt)
        self.generation_tokens.observe(generated)
        self.e2e.observe(elapsed)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    """What the engine and service count, read at each scrape."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        svc = self.service
        stats = svc.llm.engine.stats()
        mem, c, name = stats["memory"], svc.counters, [svc.model_name]

        def gauge(metric, text, value):
            g = GaugeMetricFamily(f"gemma4:{metric}", text, labels=["model_name"])
            g.add_metric(name, value)
            return g

        def counter(metric, text, value):
            m = CounterMetricFamily(f"gemma4:{metric}", text, labels=["model_name"])
            m.add_metric(name, value)
            return m

        total = mem["used_bytes"] + mem["free_bytes"]
        yield gauge("num_requests_running", "Requests in the engine's batch.", stats["running"])
        yield gauge("num_requests_waiting", "Requests waiting for the engine.", stats["waiting"])
        yield gauge("kv_cache_usage_perc", "Share of the K/V cache in use (1 = full).",
                    mem["used_bytes"] / total if total else 0.0)
        yield gauge("kv_cache_used_bytes", "K/V cache bytes in use.", mem["used_bytes"])
        yield gauge("kv_cache_free_bytes", "K/V cache bytes free (cached prefixes included).", mem["free_bytes"])
        yield gauge("media_jobs", "Requests loading media.", svc.media_jobs)
        yield counter("num_preemptions", "Sequences preempted (their K/V freed, recomputed later).",
                      stats["preemptions"])
        yield counter("prompt_tokens", "Prompt tokens of the requests run.", c["prompt_tokens_total"])
        yield counter("generation_tokens", "Tokens generated.", c["generation_tokens_total"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", c["prompt_tokens_total"])
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats["cached_prompt_tokens"])
        yield counter("requests", "Requests admitted.", c["requests_total"])
        yield counter("requests_failed", "Requests answered with an error.", c["requests_failed_total"])
        drafts = stats["drafts"]
        if drafts is not None:  # speculative decoding, as vLLM's spec_decode counters
            yield counter("spec_decode_num_draft_tokens", "Draft tokens verified.", drafts["drafted"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", drafts["accepted"])
            for metric, key in (("spec_decode_num_accepted_tokens_per_pos", "accepted_at"),
                                ("spec_decode_num_draft_tokens_per_pos", "drafted_at")):
                m = CounterMetricFamily(f"gemma4:{metric}", f"Draft tokens {key.split('_')[0]} at each position.",
                                        labels=["model_name", "position"])
                for i, n in enumerate(drafts[key]):
                    m.add_metric([svc.model_name, str(i)], n)
                yield m
