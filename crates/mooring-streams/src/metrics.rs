//! Per-stream and per-export counters served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabels {
    pub stream: String,
    pub export: String,
}

/// The stream manager's metric families; clones share the same counters.
#[derive(Clone, Default)]
pub struct StreamMetrics {
    appended_messages: Family<StreamLabels, Counter>,
    appended_bytes: Family<StreamLabels, Counter>,
    read_messages: Family<StreamLabels, Counter>,
    exported_messages: Family<ExportLabels, Counter>,
    exported_bytes: Family<ExportLabels, Counter>,
    export_failures: Family<ExportLabels, Counter>,
}

impl StreamMetrics {
    /// Registers every family with the process registry.
    pub fn register(&self, metrics: &mooring_core::metrics::Metrics) {
        metrics.register(
            "streams_appended_messages",
            "Messages appended per stream",
            self.appended_messages.clone(),
        );
        metrics.register(
            "streams_appended_bytes",
            "Payload bytes appended per stream",
            self.appended_bytes.clone(),
        );
        metrics.register(
            "streams_read_messages",
            "Messages returned by ReadMessages per stream",
            self.read_messages.clone(),
        );
        metrics.register(
            "streams_exported_messages",
            "Messages exported per stream and export",
            self.exported_messages.clone(),
        );
        metrics.register(
            "streams_exported_bytes",
            "Payload bytes exported per stream and export",
            self.exported_bytes.clone(),
        );
        metrics.register(
            "streams_export_failures",
            "Failed export attempts per stream and export",
            self.export_failures.clone(),
        );
    }

    fn stream(name: &str) -> StreamLabels {
        StreamLabels {
            stream: name.to_string(),
        }
    }

    fn export(stream: &str, export: &str) -> ExportLabels {
        ExportLabels {
            stream: stream.to_string(),
            export: export.to_string(),
        }
    }

    pub fn appended(&self, stream: &str, bytes: usize) {
        let labels = Self::stream(stream);
        self.appended_messages.get_or_create(&labels).inc();
        self.appended_bytes
            .get_or_create(&labels)
            .inc_by(bytes as u64);
    }

    pub fn read(&self, stream: &str, messages: usize) {
        self.read_messages
            .get_or_create(&Self::stream(stream))
            .inc_by(messages as u64);
    }

    pub fn exported(&self, stream: &str, export: &str, messages: usize, bytes: i64) {
        let labels = Self::export(stream, export);
        self.exported_messages
            .get_or_create(&labels)
            .inc_by(messages as u64);
        self.exported_bytes
            .get_or_create(&labels)
            .inc_by(bytes.max(0) as u64);
    }

    pub fn export_failed(&self, stream: &str, export: &str) {
        self.export_failures
            .get_or_create(&Self::export(stream, export))
            .inc();
    }
}
