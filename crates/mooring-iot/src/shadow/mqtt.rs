//! The shadow device topics over MQTT: a publish on `$aws/things/<thing>/shadow/get`,
//! `…/update` or `…/delete` (or the same under `…/shadow/name/<shadow>/`) is a request; the
//! answer is published, as an ordinary broker message any authorized subscriber and the
//! rules engine see, on `<request topic>/accepted` or `/rejected`, plus `/update/delta` and
//! `/update/documents` after an accepted update. Requests are handled one at a time in
//! arrival order, and an update is durable before its `accepted` goes out.

use std::sync::Arc;

use bytes::Bytes;
use mooring_mqtt::{Broker, Message};
use tokio::sync::mpsc;

use super::model::{self, ShadowError, ShadowKey};
use super::Shadows;

/// A shadow operation named by a request topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Get,
    Update,
    Delete,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// The thing, shadow name and operation of a request topic; `None` for every other topic
/// (responses included).
pub fn parse_topic(topic: &str) -> Option<(String, Option<String>, Operation)> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once("/shadow/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (name, op) = match parts.as_slice() {
        [op] => (None, *op),
        ["name", name, op] => (Some(name.to_string()), *op),
        _ => return None,
    };
    let op = match op {
        "get" => Operation::Get,
        "update" => Operation::Update,
        "delete" => Operation::Delete,
        _ => return None,
    };
    Some((thing.to_string(), name, op))
}

struct Request {
    topic: String,
    payload: Bytes,
    qos: u8,
}

/// Subscribes in-process to the shadow topics of every thing and answers requests.
pub fn attach(shadows: Arc<Shadows>, broker: &Broker) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel::<Request>();
    let subscription = broker
        .subscribe_callback(
            "$aws/things/+/shadow/#",
            Arc::new(move |m: &Arc<Message>| {
                if parse_topic(&m.topic).is_some() {
                    let _ = tx.send(Request {
                        topic: m.topic.clone(),
                        payload: m.payload.clone(),
                        qos: m.qos,
                    });
                }
            }),
        )
        .map_err(|e| anyhow::anyhow!("subscribing to the shadow topics: {e}"))?;
    tokio::spawn(async move {
        let _subscription = subscription;
        serve(shadows, rx).await;
    });
    Ok(())
}

async fn serve(shadows: Arc<Shadows>, mut rx: mpsc::UnboundedReceiver<Request>) {
    while let Some(request) = rx.recv().await {
        answer(&shadows, request).await;
    }
}

async fn answer(shadows: &Shadows, request: Request) {
    let Some((thing, name, op)) = parse_topic(&request.topic) else {
        return;
    };
    let qos = request.qos.min(1);
    let reject = |e: ShadowError, token: Option<String>| {
        let topic = format!("{}/rejected", request.topic);
        let body = e.document(shadows.now(), token.as_deref());
        (topic, body)
    };
    let key = match ShadowKey::new(&thing, name.as_deref()) {
        Ok(key) => key,
        Err(e) => {
            let (topic, body) = reject(e, model::client_token_of(&request.payload));
            shadows.publish(topic, &body, qos).await;
            return;
        }
    };
    let accepted = format!("{}/{}/accepted", key.topic_prefix(), op.as_str());
    match op {
        Operation::Get | Operation::Delete => {
            // Both reply with one document on `accepted`, echoing the request's clientToken.
            let outcome = match model::parse_client_token(&request.payload) {
                Ok(token) => {
                    let document = if matches!(op, Operation::Get) {
                        let now = shadows.now();
                        shadows
                            .get(&key)
                            .await
                            .map(|s| s.render(now, token.as_deref()))
                    } else {
                        shadows.delete(&key, token.as_deref()).await
                    };
                    document.map_err(|e| (e, token))
                }
                Err(e) => Err((e, None)),
            };
            match outcome {
                Ok(document) => shadows.publish(accepted, &document, qos).await,
                Err((e, token)) => {
                    let (topic, body) = reject(e, token);
                    shadows.publish(topic, &body, qos).await
                }
            }
        }
        Operation::Update => match shadows.update(&key, &request.payload).await {
            Ok(applied) => shadows.publish_update(&key, &applied, qos).await,
            Err(e) => {
                let (topic, body) = reject(e, model::client_token_of(&request.payload));
                shadows.publish(topic, &body, qos).await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_name_thing_shadow_and_operation() {
        assert_eq!(
            parse_topic("$aws/things/t1/shadow/update"),
            Some(("t1".into(), None, Operation::Update))
        );
        assert_eq!(
            parse_topic("$aws/things/t1/shadow/name/cfg/get"),
            Some(("t1".into(), Some("cfg".into()), Operation::Get))
        );
        assert_eq!(
            parse_topic("$aws/things/t1/shadow/name/cfg/delete"),
            Some(("t1".into(), Some("cfg".into()), Operation::Delete))
        );
        for reply in [
            "$aws/things/t1/shadow/update/accepted",
            "$aws/things/t1/shadow/update/delta",
            "$aws/things/t1/shadow/name/cfg/update/documents",
            "$aws/things/t1/shadow/get/rejected",
            "$aws/things/t1/shadow/name/cfg",
            "$aws/things/t1/jobs/get",
            "$aws/things/t1/shadow/list",
        ] {
            assert_eq!(parse_topic(reply), None, "{reply}");
        }
    }
}
