//! MQTT over WebSocket at `/mqtt` on the HTTP port, as an [`AwsService`] of the front door.
//!
//! The route authenticates itself ([`Authentication::Service`]): a SigV4-presigned URL
//! (service `iotdevicegateway`, as AWS IoT's SDKs sign it) is verified by the front door
//! and the client is identified by its access key; an unsigned request is accepted only
//! when `mqtt.allow_anonymous` is true. The body is streamed so that the HTTP upgrade
//! survives. Binary WebSocket frames carry MQTT bytes in either direction; a bridge task
//! copies them to and from an in-memory pipe on which the ordinary connection code runs.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocket};
use axum::extract::{ConnectInfo, FromRequest, WebSocketUpgrade};
use axum::http::{Method, Response, StatusCode};
use axum::response::IntoResponse;
use bytes::BytesMut;
use futures::future::BoxFuture;
use mooring_aws::{
    Authentication, AwsError, AwsRequest, AwsService, BodyMode, OperationName, Protocol, Route,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::{Principal, Transport};
use crate::broker::Broker;
use crate::connection::{self, PeerInfo};

pub struct MqttOverWebSocket {
    broker: Broker,
}

impl MqttOverWebSocket {
    pub fn new(broker: Broker) -> Self {
        MqttOverWebSocket { broker }
    }
}

impl AwsService for MqttOverWebSocket {
    fn name(&self) -> &'static str {
        "mqtt-websocket"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["iotdevicegateway", "iotdata", "iot"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        route.method == Method::GET && route.path == "/mqtt"
    }

    fn body_mode(&self, _route: &Route<'_>) -> BodyMode {
        BodyMode::Streaming
    }

    fn authentication(&self, _route: &Route<'_>) -> Authentication {
        Authentication::Service
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let broker = self.broker.clone();
        Box::pin(async move {
            let principal = match &request.context.access_key_id {
                Some(key) => Principal::SigV4 {
                    access_key_id: std::sync::Arc::from(key.as_str()),
                },
                None if broker.settings().allow_anonymous => Principal::Anonymous,
                None => {
                    return AwsError::new(
                        StatusCode::FORBIDDEN,
                        "ForbiddenException",
                        "MQTT over WebSocket requires a SigV4-presigned URL",
                    )
                    .into_response(Protocol::RestJson1)
                }
            };
            let remote = request
                .request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            let upgrade = match WebSocketUpgrade::from_request(request.request, &()).await {
                Ok(u) => u,
                Err(rejection) => return rejection.into_response(),
            };
            let peer = PeerInfo {
                transport: Transport::WebSocket,
                remote,
                principal,
            };
            let mut response = upgrade
                .protocols(["mqtt", "mqttv3.1"])
                .on_upgrade(move |socket| bridge(socket, broker, peer));
            response
                .extensions_mut()
                .insert(OperationName("MqttOverWebSocket".into()));
            response
        })
    }
}

/// Copies MQTT bytes between the WebSocket and the connection's pipe.
async fn bridge(mut socket: WebSocket, broker: Broker, peer: PeerInfo) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let shutdown = broker.shutdown().clone();
    shutdown.spawn(connection::serve(broker, theirs, peer));
    let (mut reader, mut writer) = tokio::io::split(ours);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Binary(data))) => {
                    if writer.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(WsMessage::Text(_))) => break,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
            },
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    break;
                }
                Ok(_) => {
                    let frame = buf.split().freeze();
                    if socket.send(WsMessage::Binary(frame)).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = writer.shutdown().await;
}
