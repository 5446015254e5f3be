//! `GET /metrics`: Prometheus text for requests, tokens, sequences and
//! latencies (`prometheus-client`), every series labelled with the
//! replica's id so that figures stay apart when they are federated or
//! summed across replicas.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::decoder::Generation;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: String,
}

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    completion_tokens: Counter,
    request_seconds: Histogram,
    first_token_seconds: Histogram,
    active: Gauge,
    queued: Gauge,
}

impl Metrics {
    pub fn new(replica: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "tofy",
            [("replica".into(), replica.to_string().into())].into_iter(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let (prompt_tokens, cached_tokens, completion_tokens) =
            (Counter::default(), Counter::default(), Counter::default());
        // 5 ms to about 3 minutes.
        let request_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        let first_token_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        let (active, queued) = (Gauge::default(), Gauge::default());
        registry.register(
            "requests",
            "HTTP requests by route and status code",
            requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished generations",
            prompt_tokens.clone(),
        );
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens reused from the KV cache",
            cached_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Generated tokens",
            completion_tokens.clone(),
        );
        registry.register(
            "generation_duration_seconds",
            "Time from the decoder call (queue included) to the end of a generation",
            request_seconds.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from the decoder call (queue included) to the first piece of the reply",
            first_token_seconds.clone(),
        );
        registry.register(
            "sequences_active",
            "Sequences the decoder is evaluating",
            active.clone(),
        );
        registry.register(
            "sequences_queued",
            "Admitted requests waiting for a sequence",
            queued.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            request_seconds,
            first_token_seconds,
            active,
            queued,
        }
    }

    pub fn record_request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn record_generation(&self, g: &Generation) {
        self.prompt_tokens.inc_by(g.prompt_tokens as u64);
        self.cached_tokens.inc_by(g.cached_tokens as u64);
        self.completion_tokens.inc_by(g.completion_tokens as u64);
        self.request_seconds.observe(g.total_time.as_secs_f64());
        if g.completion_tokens > 0 {
            self.first_token_seconds
                .observe(g.time_to_first_token.as_secs_f64());
        }
    }

    /// The text exposition, with the sequence gauges read now.
    pub fn render(&self, active: usize, queued: usize) -> String {
        self.active.set(active as i64);
        self.queued.set(queued as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
