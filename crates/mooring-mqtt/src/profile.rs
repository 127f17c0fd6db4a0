//! The two behaviour profiles, chosen by `mqtt.profile`.
//!
//! `aws` (the default) follows AWS IoT Core's documented deviations from the MQTT
//! specifications; `strict` follows MQTT 3.1.1 and 5.0 as written. Every place where the
//! broker's behaviour differs reads one field of [`Profile`], so the list of deviations is
//! this struct.

/// Largest PUBLISH payload AWS IoT accepts (128 KiB).
pub const AWS_MAX_PAYLOAD: usize = 128 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    /// Highest QoS served (AWS: 1; QoS 2 subscriptions are granted QoS 1 and QoS 2
    /// publishes close the connection, MQTT 5 with 0x9B).
    pub maximum_qos: u8,
    /// `a/#` does not match `a` (AWS).
    pub hash_excludes_parent: bool,
    /// Retained messages are delivered on subscribe only to filters equal to the topic (AWS).
    pub retained_only_exact: bool,
    /// `$` topics other than the allowed `$aws/...` directions are refused (AWS).
    pub aws_reserved_topics: bool,
    pub max_topic_bytes: Option<usize>,
    pub max_topic_slashes: Option<usize>,
    pub max_payload: Option<usize>,
    /// Largest packet the decoder accepts.
    pub max_packet_size: usize,
    pub max_filters_per_subscribe: Option<usize>,
    pub max_subscriptions_per_connection: Option<usize>,
    pub max_client_id_bytes: Option<usize>,
    /// Keep-alive clamp (AWS: 0 means 1200, 1-29 become 30, above 1200 become 1200).
    pub clamp_keep_alive: bool,
    /// Topic aliases a client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Subscription identifiers (AWS does not support them: DISCONNECT 0xA1).
    pub subscription_identifiers: bool,
    /// A session created by one protocol version cannot be resumed by the other (AWS).
    pub cross_version_sessions: bool,
    /// Longest session expiry granted, seconds.
    pub max_session_expiry: u32,
    /// Session expiry used for MQTT 3.1.1 persistent sessions, seconds.
    pub default_session_expiry: u32,
    /// Inbound PUBLISH packets one connection may send per second (AWS: 100); beyond it an
    /// MQTT 5 publish is refused with 0x97 and an MQTT 3.1.1 connection is closed
    /// (`THROTTLED`).
    pub publishes_per_second: Option<u32>,
    /// CONNECTs one client id may make per second (AWS: 1); a CONNECT sooner than
    /// `1 s / limit` after the last accepted one with the same id is refused (MQTT 5
    /// CONNACK 0x9F, MQTT 3.1.1 CONNACK 3) and leaves the connected client alone.
    pub connects_per_second_per_client: Option<u32>,
    /// Bytes one connection may send per second (AWS: 512 KiB); beyond a one-second burst
    /// the connection's further reads are delayed (the excess is slowed, not dropped).
    pub bytes_per_second_per_connection: Option<u64>,
    /// Longest keep-alive granted to MQTT 5 clients (announced as Server Keep Alive); 0 or
    /// larger requests are lowered to it. MQTT 3.1.1 clients cannot be told, so they keep
    /// theirs.
    pub max_keep_alive: Option<u16>,
    /// Longest life of a WebSocket connection (AWS: 24 h), then `WEBSOCKET_TTL_EXPIRATION`.
    pub websocket_ttl_secs: Option<u64>,
    /// Topic filters nobody may subscribe to (SUBACK 0x80), as a broker-wide block list.
    pub refused_subscriptions: Vec<String>,
}

/// The `[broker]` configuration section: adjusts the chosen profile's limits. Absent keys
/// keep the profile's value; 0 removes a limit.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerTuning {
    pub publishes_per_second: Option<u32>,
    pub connects_per_second_per_client: Option<u32>,
    pub bytes_per_second_per_connection: Option<u64>,
    pub max_keep_alive: Option<u16>,
    pub websocket_ttl_secs: Option<u64>,
    pub subscriptions_per_connection: Option<usize>,
    pub refused_subscriptions: Vec<String>,
}

impl BrokerTuning {
    /// The profile with these adjustments applied.
    pub fn apply(&self, mut profile: Profile) -> Profile {
        fn limit<T: PartialEq + Default>(value: Option<T>, current: Option<T>) -> Option<T> {
            match value {
                None => current,
                Some(v) if v == T::default() => None,
                Some(v) => Some(v),
            }
        }
        profile.publishes_per_second =
            limit(self.publishes_per_second, profile.publishes_per_second);
        profile.connects_per_second_per_client = limit(
            self.connects_per_second_per_client,
            profile.connects_per_second_per_client,
        );
        profile.bytes_per_second_per_connection = limit(
            self.bytes_per_second_per_connection,
            profile.bytes_per_second_per_connection,
        );
        profile.max_keep_alive = limit(self.max_keep_alive, profile.max_keep_alive);
        profile.websocket_ttl_secs = limit(self.websocket_ttl_secs, profile.websocket_ttl_secs);
        profile.max_subscriptions_per_connection = limit(
            self.subscriptions_per_connection,
            profile.max_subscriptions_per_connection,
        );
        profile
            .refused_subscriptions
            .extend(self.refused_subscriptions.iter().cloned());
        profile
    }
}

impl Profile {
    pub fn aws() -> Self {
        Profile {
            name: "aws",
            maximum_qos: 1,
            hash_excludes_parent: true,
            retained_only_exact: true,
            aws_reserved_topics: true,
            max_topic_bytes: Some(256),
            max_topic_slashes: Some(7),
            max_payload: Some(AWS_MAX_PAYLOAD),
            max_packet_size: AWS_MAX_PAYLOAD + 16 * 1024,
            max_filters_per_subscribe: Some(8),
            max_subscriptions_per_connection: Some(50),
            max_client_id_bytes: Some(128),
            clamp_keep_alive: true,
            topic_alias_maximum: 8,
            subscription_identifiers: false,
            cross_version_sessions: false,
            // AWS allows up to 7 days, but the default account maximum is 1 hour.
            max_session_expiry: 3600,
            default_session_expiry: 3600,
            publishes_per_second: Some(100),
            connects_per_second_per_client: Some(1),
            bytes_per_second_per_connection: Some(512 * 1024),
            max_keep_alive: None,
            websocket_ttl_secs: Some(24 * 3600),
            refused_subscriptions: Vec::new(),
        }
    }

    pub fn strict() -> Self {
        Profile {
            name: "strict",
            maximum_qos: 2,
            hash_excludes_parent: false,
            retained_only_exact: false,
            aws_reserved_topics: false,
            max_topic_bytes: None,
            max_topic_slashes: None,
            max_payload: None,
            max_packet_size: 16 * 1024 * 1024,
            max_filters_per_subscribe: None,
            max_subscriptions_per_connection: None,
            max_client_id_bytes: None,
            clamp_keep_alive: false,
            topic_alias_maximum: 64,
            subscription_identifiers: true,
            cross_version_sessions: true,
            max_session_expiry: u32::MAX,
            default_session_expiry: 3600,
            publishes_per_second: None,
            connects_per_second_per_client: None,
            bytes_per_second_per_connection: None,
            max_keep_alive: None,
            websocket_ttl_secs: None,
            refused_subscriptions: Vec::new(),
        }
    }

    pub fn by_name(name: &str) -> anyhow::Result<Self> {
        match name {
            "" | "aws" => Ok(Profile::aws()),
            "strict" => Ok(Profile::strict()),
            other => anyhow::bail!("mqtt.profile must be \"aws\" or \"strict\", got {other:?}"),
        }
    }

    /// The keep-alive actually applied for a requested value, seconds (0 = none).
    pub fn keep_alive(&self, requested: u16, version: u8) -> u16 {
        if let Some(max) = self.max_keep_alive {
            if version == crate::codec::V5 && (requested == 0 || requested > max) {
                return max;
            }
        }
        if !self.clamp_keep_alive {
            return requested;
        }
        match requested {
            0 => 1200,
            1..=29 => 30,
            v if v > 1200 => 1200,
            v => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_limits_connects_and_bytes_and_the_broker_section_adjusts_them() {
        let aws = Profile::aws();
        assert_eq!(aws.connects_per_second_per_client, Some(1));
        assert_eq!(aws.bytes_per_second_per_connection, Some(512 * 1024));
        let strict = Profile::strict();
        assert_eq!(strict.connects_per_second_per_client, None);
        assert_eq!(strict.bytes_per_second_per_connection, None);
        let tuned = BrokerTuning {
            connects_per_second_per_client: Some(0),
            bytes_per_second_per_connection: Some(4096),
            ..Default::default()
        }
        .apply(Profile::aws());
        assert_eq!(
            tuned.connects_per_second_per_client, None,
            "0 removes the limit"
        );
        assert_eq!(tuned.bytes_per_second_per_connection, Some(4096));
        assert_eq!(
            BrokerTuning::default().apply(Profile::aws()),
            Profile::aws()
        );
    }
}
