//! Process metrics served at `/metrics` in Prometheus text format.
//!
//! The front door records every AWS request with its service, operation and status; services
//! add their own metrics to the shared registry at wiring time through [`Metrics::register`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub operation: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub service: String,
    pub operation: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ])
}

/// The shared registry plus the front door's request metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<OperationLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mooring");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<OperationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "aws_requests",
            "AWS API requests by service, operation and HTTP status",
            requests.clone(),
        );
        registry.register(
            "aws_request_duration_seconds",
            "AWS API request latency by service and operation",
            latency.clone(),
        );
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
        }
    }

    /// Records one AWS API request.
    pub fn observe_request(&self, service: &str, operation: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                service: service.to_string(),
                operation: operation.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&OperationLabels {
                service: service.to_string(),
                operation: operation.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Adds a service's own metric to the registry.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// The whole registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_request_counts_and_latencies() {
        let metrics = Metrics::new();
        metrics.observe_request("events", "PutEvents", 200, Duration::from_millis(3));
        metrics.observe_request("events", "PutEvents", 200, Duration::from_millis(4));
        let text = metrics.render();
        assert!(
            text.contains(
                "mooring_aws_requests_total{service=\"events\",operation=\"PutEvents\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("mooring_aws_request_duration_seconds_count{service=\"events\",operation=\"PutEvents\"} 2"), "{text}");
    }
}
