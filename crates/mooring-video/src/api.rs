//! The control-plane operations, one function each: parse the JSON request, apply the model's
//! rules against the store, render the JSON response or the KVS error.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Response;
use base64::Engine;
use mooring_aws::{json_response, AwsRequest, OperationName, Protocol};
use serde_json::{json, Map, Value};

use crate::model::{
    self, json_timestamp, validate_device_name, validate_kms_key_id, validate_media_type,
    validate_stream_arn, validate_stream_name, validate_tag_key, validate_tags, validate_version,
    ErrorKind, Stream, StreamRef, VideoError, VideoResult,
};
use crate::stream_configurations::{self as configs, ConfigKind};
use crate::{error_response, VideoState};

/// A request body: a JSON object whose `null` members count as absent.
pub struct JsonRequest(Map<String, Value>);

impl JsonRequest {
    pub fn parse(body: &[u8]) -> VideoResult<JsonRequest> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(JsonRequest(Map::new()));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(JsonRequest(map)),
            _ => Err(VideoError::invalid("The request body is not a JSON object")),
        }
    }

    pub fn value(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    pub fn string(&self, field: &str) -> VideoResult<Option<String>> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(VideoError::invalid(format!("{field} must be a string"))),
        }
    }

    pub fn required_string(&self, field: &str) -> VideoResult<String> {
        self.string(field)?.ok_or_else(|| {
            VideoError::invalid(format!(
                "1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"
            ))
        })
    }

    pub fn integer(&self, field: &str) -> VideoResult<Option<i64>> {
        match self.value(field) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| VideoError::invalid(format!("{field} must be an integer"))),
        }
    }

    pub fn object(&self, field: &str) -> VideoResult<Option<JsonRequest>> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(JsonRequest(m.clone()))),
            Some(_) => Err(VideoError::invalid(format!("{field} must be an object"))),
        }
    }

    pub fn string_list(&self, field: &str) -> VideoResult<Option<Vec<String>>> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| VideoError::invalid(format!("{field} must hold strings")))
                })
                .collect::<VideoResult<Vec<_>>>()
                .map(Some),
            Some(_) => Err(VideoError::invalid(format!("{field} must be a list"))),
        }
    }

    /// A `{key: value}` tag map.
    pub fn tag_map(&self, field: &str) -> VideoResult<Option<BTreeMap<String, String>>> {
        match self.value(field) {
            None => Ok(None),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.clone(), s.to_string()))
                        .ok_or_else(|| VideoError::invalid("Tag values must be strings"))
                })
                .collect::<VideoResult<BTreeMap<_, _>>>()
                .map(Some),
            Some(_) => Err(VideoError::invalid(format!("{field} must be a map"))),
        }
    }

    /// The stream named by `StreamName` / `StreamARN`.
    pub fn stream_ref(&self) -> VideoResult<StreamRef> {
        StreamRef::from_parts(self.string("StreamName")?, self.string("StreamARN")?)
    }
}

/// Looks a stream up by name or ARN; RNF when missing.
pub fn find_stream(state: &VideoState, stream: &StreamRef) -> VideoResult<Stream> {
    let found = match stream {
        StreamRef::Name(name) => state.store.stream_by_name(name)?,
        StreamRef::Arn(arn) => state.store.stream_by_arn(arn)?,
    };
    found.ok_or_else(|| {
        VideoError::not_found(format!(
            "The requested stream {} does not exist",
            stream.describe()
        ))
    })
}

/// Routes a control-plane request.
pub async fn dispatch(state: Arc<VideoState>, path: &str, request: AwsRequest) -> Response<Body> {
    let operation = match path {
        "/createStream" => "CreateStream",
        "/describeStream" => "DescribeStream",
        "/listStreams" => "ListStreams",
        "/updateStream" => "UpdateStream",
        "/deleteStream" => "DeleteStream",
        "/updateDataRetention" => "UpdateDataRetention",
        "/tagStream" => "TagStream",
        "/untagStream" => "UntagStream",
        "/listTagsForStream" => "ListTagsForStream",
        "/TagResource" => "TagResource",
        "/UntagResource" => "UntagResource",
        "/ListTagsForResource" => "ListTagsForResource",
        "/updateImageGenerationConfiguration" => "UpdateImageGenerationConfiguration",
        "/describeImageGenerationConfiguration" => "DescribeImageGenerationConfiguration",
        "/updateNotificationConfiguration" => "UpdateNotificationConfiguration",
        "/describeNotificationConfiguration" => "DescribeNotificationConfiguration",
        _ => "GetDataEndpoint",
    };
    let host = request.header("host").map(str::to_string);
    let region = request.context.region.clone();
    let result = match JsonRequest::parse(&request.body) {
        Err(e) => Err(e),
        Ok(req) => {
            let op = operation;
            state
                .blocking(move |s| match op {
                    "CreateStream" => create_stream(s, &req, &region),
                    "DescribeStream" => describe_stream(s, &req),
                    "ListStreams" => list_streams(s, &req),
                    "UpdateStream" => update_stream(s, &req),
                    "DeleteStream" => delete_stream(s, &req),
                    "UpdateDataRetention" => update_data_retention(s, &req),
                    "TagStream" => tag_stream(s, &req),
                    "UntagStream" => untag_stream(s, &req),
                    "ListTagsForStream" => list_tags_for_stream(s, &req),
                    "TagResource" => tag_resource(s, &req),
                    "UntagResource" => untag_resource(s, &req),
                    "ListTagsForResource" => list_tags_for_resource(s, &req),
                    "UpdateImageGenerationConfiguration" => {
                        configs::update(s, &req, ConfigKind::ImageGeneration)
                    }
                    "DescribeImageGenerationConfiguration" => {
                        configs::describe(s, &req, ConfigKind::ImageGeneration)
                    }
                    "UpdateNotificationConfiguration" => {
                        configs::update(s, &req, ConfigKind::Notification)
                    }
                    "DescribeNotificationConfiguration" => {
                        configs::describe(s, &req, ConfigKind::Notification)
                    }
                    _ => get_data_endpoint(s, &req, host.as_deref()),
                })
                .await
        }
    };
    match result {
        Ok(body) => {
            let mut response = json_response(Protocol::RestJson1, &body);
            response
                .extensions_mut()
                .insert(OperationName(operation.to_string()));
            response
        }
        Err(e) => error_response(&e, operation),
    }
}

/// `StreamInfo` as DescribeStream and ListStreams return it.
pub fn stream_info(s: &Stream) -> Value {
    let mut info = json!({
        "StreamName": s.name,
        "StreamARN": s.arn,
        "KmsKeyId": s.kms_key_id,
        "Version": s.version,
        "Status": s.status,
        "CreationTime": json_timestamp(s.creation_ms),
        "DataRetentionInHours": s.retention_hours,
    });
    if let Some(d) = &s.device_name {
        info["DeviceName"] = json!(d);
    }
    if let Some(m) = &s.media_type {
        info["MediaType"] = json!(m);
    }
    info
}

fn create_stream(s: &VideoState, req: &JsonRequest, region: &str) -> VideoResult<Value> {
    let name = req.required_string("StreamName")?;
    validate_stream_name(&name, "StreamName")?;
    let device_name = req.string("DeviceName")?;
    if let Some(d) = &device_name {
        validate_device_name(d)?;
    }
    let media_type = req.string("MediaType")?;
    if let Some(m) = &media_type {
        validate_media_type(m)?;
    }
    let kms_key_id = req.string("KmsKeyId")?;
    if let Some(k) = &kms_key_id {
        validate_kms_key_id(k)?;
    }
    let retention = req.integer("DataRetentionInHours")?.unwrap_or(0);
    if !(0..=model::MAX_RETENTION_HOURS).contains(&retention) {
        return Err(VideoError::invalid(format!(
            "DataRetentionInHours must be between 0 and {}",
            model::MAX_RETENTION_HOURS
        )));
    }
    let tags = req.tag_map("Tags")?.unwrap_or_default();
    if !tags.is_empty() {
        validate_tags(&tags)?;
    }
    let storage_tier = match req.object("StreamStorageConfiguration")? {
        None => "HOT".to_string(),
        Some(c) => {
            let tier = c.required_string("DefaultStorageTier")?;
            if tier != "HOT" && tier != "WARM" {
                return Err(VideoError::invalid(
                    "DefaultStorageTier must be HOT or WARM",
                ));
            }
            tier
        }
    };
    let now = s.clock().now_millis();
    let account = &s.ctx.arns.account_id;
    let stream = Stream {
        arn: format!("arn:aws:kinesisvideo:{region}:{account}:stream/{name}/{now}"),
        kms_key_id: kms_key_id
            .unwrap_or_else(|| format!("arn:aws:kms:{region}:{account}:alias/aws/kinesisvideo")),
        name,
        device_name,
        media_type,
        retention_hours: retention,
        version: model::new_version(),
        status: "ACTIVE".into(),
        creation_ms: now,
        storage_tier,
        tags,
    };
    if !s.store.insert_stream(&stream)? {
        return Err(VideoError::new(
            ErrorKind::ResourceInUse,
            format!("The stream {} already exists", stream.name),
        ));
    }
    Ok(json!({ "StreamARN": stream.arn }))
}

fn describe_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream = find_stream(s, &req.stream_ref()?)?;
    Ok(json!({ "StreamInfo": stream_info(&stream) }))
}

fn decode_token(token: &str) -> VideoResult<String> {
    base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| VideoError::invalid("NextToken is not valid"))
}

fn encode_token(value: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

fn list_streams(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let max = req.integer("MaxResults")?.unwrap_or(10_000);
    if !(1..=10_000).contains(&max) {
        return Err(VideoError::invalid(
            "1 validation error detected: Value at 'MaxResults' failed to satisfy constraint: Member must have value between 1 and 10000",
        ));
    }
    let after = match req.string("NextToken")? {
        Some(t) if t.len() > 1024 => return Err(VideoError::invalid("NextToken is too long")),
        Some(t) if !t.is_empty() => decode_token(&t)?,
        _ => String::new(),
    };
    let prefix = match req.object("StreamNameCondition")? {
        None => String::new(),
        Some(c) => {
            if let Some(op) = c.string("ComparisonOperator")? {
                if op != "BEGINS_WITH" {
                    return Err(VideoError::invalid(
                        "ComparisonOperator must be BEGINS_WITH",
                    ));
                }
            }
            match c.string("ComparisonValue")? {
                Some(v) => {
                    validate_stream_name(&v, "ComparisonValue")?;
                    v
                }
                None => String::new(),
            }
        }
    };
    let mut streams = s.store.list_streams(&prefix, &after, max as usize + 1)?;
    let more = streams.len() > max as usize;
    streams.truncate(max as usize);
    let mut out = json!({
        "StreamInfoList": streams.iter().map(stream_info).collect::<Vec<_>>(),
    });
    if more {
        if let Some(last) = streams.last() {
            out["NextToken"] = json!(encode_token(&last.name));
        }
    }
    Ok(out)
}

fn check_version(stream: &Stream, version: &str) -> VideoResult<()> {
    if stream.version != version {
        return Err(VideoError::new(
            ErrorKind::VersionMismatch,
            format!(
                "The version {version} does not match the current version of stream {}",
                stream.name
            ),
        ));
    }
    Ok(())
}

fn save(s: &VideoState, mut stream: Stream, expected_version: &str) -> VideoResult<()> {
    stream.version = model::new_version();
    if !s.store.update_stream(&stream, expected_version)? {
        return Err(VideoError::new(
            ErrorKind::VersionMismatch,
            "The stream was modified concurrently",
        ));
    }
    Ok(())
}

fn update_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let version = req.required_string("CurrentVersion")?;
    validate_version(&version)?;
    let device_name = req.string("DeviceName")?;
    if let Some(d) = &device_name {
        validate_device_name(d)?;
    }
    let media_type = req.string("MediaType")?;
    if let Some(m) = &media_type {
        validate_media_type(m)?;
    }
    let mut stream = find_stream(s, &stream_ref)?;
    check_version(&stream, &version)?;
    if device_name.is_some() {
        stream.device_name = device_name;
    }
    if media_type.is_some() {
        stream.media_type = media_type;
    }
    save(s, stream, &version)?;
    Ok(json!({}))
}

fn delete_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let arn = req.required_string("StreamARN")?;
    validate_stream_arn(&arn)?;
    let version = req.string("CurrentVersion")?;
    if let Some(v) = &version {
        validate_version(v)?;
    }
    let stream = find_stream(s, &StreamRef::Arn(arn.clone()))?;
    if let Some(v) = &version {
        check_version(&stream, v)?;
    }
    s.store.delete_stream(&arn)?;
    s.fragments.drop_stream(&arn);
    Ok(json!({}))
}

fn update_data_retention(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let version = req.required_string("CurrentVersion")?;
    validate_version(&version)?;
    let operation = req.required_string("Operation")?;
    let change = req
        .integer("DataRetentionChangeInHours")?
        .ok_or_else(|| VideoError::invalid("DataRetentionChangeInHours is required"))?;
    if change < 1 {
        return Err(VideoError::invalid(
            "1 validation error detected: Value at 'DataRetentionChangeInHours' failed to satisfy constraint: Member must have value greater than or equal to 1",
        ));
    }
    let mut stream = find_stream(s, &stream_ref)?;
    check_version(&stream, &version)?;
    let new = match operation.as_str() {
        "INCREASE_DATA_RETENTION" => stream.retention_hours + change,
        "DECREASE_DATA_RETENTION" => stream.retention_hours - change,
        _ => {
            return Err(VideoError::invalid(
                "Operation must be INCREASE_DATA_RETENTION or DECREASE_DATA_RETENTION",
            ))
        }
    };
    if !(0..=model::MAX_RETENTION_HOURS).contains(&new) {
        return Err(VideoError::invalid(format!(
            "The resulting data retention of {new} hours is outside 0 to {} hours",
            model::MAX_RETENTION_HOURS
        )));
    }
    stream.retention_hours = new;
    let arn = stream.arn.clone();
    save(s, stream, &version)?;
    if new > 0 {
        s.fragments
            .enforce_retention(&arn, new, s.clock().now_millis())?;
    }
    Ok(json!({}))
}

/// The stream for a tagging call; a malformed ARN is `InvalidResourceFormatException`.
fn tagging_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Stream> {
    if let Some(arn) = req.string("StreamARN")? {
        if req.string("StreamName")?.is_none() && model::parse_stream_arn(&arn).is_none() {
            return Err(VideoError::new(
                ErrorKind::InvalidResourceFormat,
                format!("The format of the StreamARN {arn} is invalid"),
            ));
        }
    }
    find_stream(s, &req.stream_ref()?)
}

fn tag_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let tags = req
        .tag_map("Tags")?
        .ok_or_else(|| VideoError::invalid("Tags is required"))?;
    validate_tags(&tags)?;
    let mut stream = tagging_stream(s, req)?;
    let version = stream.version.clone();
    model::merge_tags(&mut stream.tags, tags)?;
    save_tags(s, stream, &version)
}

fn save_tags(s: &VideoState, stream: Stream, version: &str) -> VideoResult<Value> {
    if !s.store.update_stream(&stream, version)? {
        return Err(VideoError::new(
            ErrorKind::ResourceInUse,
            "The stream was modified concurrently",
        ));
    }
    Ok(json!({}))
}

fn tag_key_list(req: &JsonRequest) -> VideoResult<Vec<String>> {
    let keys = req
        .string_list("TagKeyList")?
        .ok_or_else(|| VideoError::invalid("TagKeyList is required"))?;
    if keys.is_empty() || keys.len() > 50 {
        return Err(VideoError::invalid(
            "TagKeyList must have between 1 and 50 items",
        ));
    }
    for k in &keys {
        validate_tag_key(k)?;
    }
    Ok(keys)
}

fn untag_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let keys = tag_key_list(req)?;
    let mut stream = tagging_stream(s, req)?;
    let version = stream.version.clone();
    for k in keys {
        stream.tags.remove(&k);
    }
    save_tags(s, stream, &version)
}

fn list_tags_for_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    if let Some(t) = req.string("NextToken")? {
        if t.len() > 1024 {
            return Err(VideoError::invalid("NextToken is too long"));
        }
    }
    let stream = tagging_stream(s, req)?;
    Ok(json!({ "Tags": stream.tags }))
}

fn resource_stream(s: &VideoState, req: &JsonRequest) -> VideoResult<Stream> {
    let arn = req.required_string("ResourceARN")?;
    if arn.is_empty() || arn.len() > 1024 || mooring_core::Arns::parse(&arn).is_none() {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{arn}' at 'ResourceARN' failed to satisfy constraint"
        )));
    }
    match model::parse_stream_arn(&arn) {
        Some(_) => find_stream(s, &StreamRef::Arn(arn)),
        None => Err(VideoError::not_found(format!(
            "The resource {arn} does not exist"
        ))),
    }
}

fn tag_resource(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let list = match req.value("Tags") {
        Some(Value::Array(items)) => items.clone(),
        _ => return Err(VideoError::invalid("Tags must be a list of {Key, Value}")),
    };
    let mut tags = BTreeMap::new();
    for item in list {
        let key = item.get("Key").and_then(Value::as_str);
        let value = item.get("Value").and_then(Value::as_str);
        match (key, value) {
            (Some(k), Some(v)) => {
                tags.insert(k.to_string(), v.to_string());
            }
            _ => return Err(VideoError::invalid("Each tag needs a Key and a Value")),
        }
    }
    validate_tags(&tags)?;
    let mut stream = resource_stream(s, req)?;
    let version = stream.version.clone();
    model::merge_tags(&mut stream.tags, tags)?;
    save_tags(s, stream, &version)
}

fn untag_resource(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let keys = tag_key_list(req)?;
    let mut stream = resource_stream(s, req)?;
    let version = stream.version.clone();
    for k in keys {
        stream.tags.remove(&k);
    }
    save_tags(s, stream, &version)
}

fn list_tags_for_resource(s: &VideoState, req: &JsonRequest) -> VideoResult<Value> {
    let stream = resource_stream(s, req)?;
    Ok(json!({ "Tags": stream.tags }))
}

const API_NAMES: &[&str] = &[
    "PUT_MEDIA",
    "GET_MEDIA",
    "LIST_FRAGMENTS",
    "GET_MEDIA_FOR_FRAGMENT_LIST",
    "GET_HLS_STREAMING_SESSION_URL",
    "GET_DASH_STREAMING_SESSION_URL",
    "GET_CLIP",
    "GET_IMAGES",
];

/// Mooring's own base URL: the configured public URL, or the request's Host when the
/// listener was bound to an ephemeral port.
pub fn data_endpoint(s: &VideoState, host: Option<&str>) -> String {
    let configured = s.ctx.config.public_http_url();
    match host {
        Some(h) if s.ctx.config.http.public_url.is_empty() && configured.ends_with(":0") => {
            format!("http://{h}")
        }
        _ => configured,
    }
}

fn get_data_endpoint(s: &VideoState, req: &JsonRequest, host: Option<&str>) -> VideoResult<Value> {
    let stream_ref = req.stream_ref()?;
    let api = req.required_string("APIName")?;
    if !API_NAMES.contains(&api.as_str()) {
        return Err(VideoError::invalid(format!(
            "1 validation error detected: Value '{api}' at 'APIName' failed to satisfy constraint: Member must satisfy enum value set: [{}]",
            API_NAMES.join(", ")
        )));
    }
    find_stream(s, &stream_ref)?;
    Ok(json!({ "DataEndpoint": data_endpoint(s, host) }))
}
