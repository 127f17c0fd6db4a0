//! The Device Shadow document rules, with no I/O: parsing and validating an update request,
//! merging it into the stored state (`null` deletes a key, objects merge deeply, arrays are
//! replaced whole), per-leaf metadata timestamps (per element for arrays), the delta
//! (desired keys whose value differs from reported, desired side only), versions and
//! optimistic locking, deletion keeping the version, and every response document shape
//! (`/get/accepted`, `/update/accepted`, `/update/delta`, `/update/documents`,
//! `/delete/accepted` and the `rejected` / HTTP error body).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Largest `desired` + `reported` state, in bytes of compact JSON (metadata excluded).
pub const MAX_STATE_BYTES: usize = 8 * 1024;
/// Deepest nesting of objects and arrays inside `desired` or `reported`.
pub const MAX_DEPTH: usize = 6;
/// Longest `clientToken`, in bytes.
pub const MAX_CLIENT_TOKEN_BYTES: usize = 64;
/// A shadow deleted longer ago than this restarts at version 0 when re-created.
pub const VERSION_MEMORY_SECS: i64 = 48 * 3600;

/// A refused request: the HTTP status (also the `code` of `/rejected`) and AWS's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowError {
    pub code: u16,
    pub message: String,
}

impl ShadowError {
    pub fn new(code: u16, message: impl Into<String>) -> ShadowError {
        ShadowError {
            code,
            message: message.into(),
        }
    }

    fn bad(message: &str) -> ShadowError {
        ShadowError::new(400, message)
    }

    /// The iot-data exception name for this status.
    pub fn exception(&self) -> &'static str {
        match self.code {
            400 => "InvalidRequestException",
            401 => "UnauthorizedException",
            404 => "ResourceNotFoundException",
            405 => "MethodNotAllowedException",
            409 => "ConflictException",
            413 => "RequestEntityTooLargeException",
            415 => "UnsupportedDocumentEncodingException",
            429 => "ThrottlingException",
            503 => "ServiceUnavailableException",
            _ => "InternalFailureException",
        }
    }

    /// The `/rejected` payload and HTTP error body.
    pub fn document(&self, timestamp: i64, client_token: Option<&str>) -> Value {
        let mut body =
            json!({ "code": self.code, "message": self.message, "timestamp": timestamp });
        if let Some(token) = client_token {
            body["clientToken"] = json!(token);
        }
        body
    }
}

/// Which shadow: a thing's classic shadow (`name` is `None`) or one of its named shadows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowKey {
    pub thing: String,
    pub name: Option<String>,
}

impl ShadowKey {
    /// Validates the thing name (1-128 of `[a-zA-Z0-9:_-]`) and the shadow name (1-64 of
    /// `[$a-zA-Z0-9:_-]`).
    pub fn new(thing: &str, name: Option<&str>) -> Result<ShadowKey, ShadowError> {
        let thing_ok = (1..=128).contains(&thing.len())
            && thing
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        if !thing_ok {
            return Err(ShadowError::bad("Invalid thing name"));
        }
        if let Some(name) = name {
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b':' | b'_' | b'-'));
            if !name_ok {
                return Err(ShadowError::bad("Invalid shadow name"));
            }
        }
        Ok(ShadowKey {
            thing: thing.to_string(),
            name: name.map(str::to_string),
        })
    }

    /// `$aws/things/<thing>/shadow` or `$aws/things/<thing>/shadow/name/<name>`.
    pub fn topic_prefix(&self) -> String {
        match &self.name {
            None => format!("$aws/things/{}/shadow", self.thing),
            Some(n) => format!("$aws/things/{}/shadow/name/{n}", self.thing),
        }
    }

    /// The 404 for this shadow: `No shadow exists with name: 'thing'` (classic) or
    /// `'thing~shadow'` (named).
    pub fn not_found(&self) -> ShadowError {
        let name = match &self.name {
            None => self.thing.clone(),
            Some(n) => format!("{}~{n}", self.thing),
        };
        ShadowError::new(404, format!("No shadow exists with name: '{name}'"))
    }
}

/// A shadow as stored. A deleted shadow keeps its row (and version) with `deleted_at` set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredShadow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_metadata: Option<Map<String, Value>>,
    pub version: i64,
    /// Epoch seconds of the last accepted update.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
}

impl StoredShadow {
    pub fn exists(&self) -> bool {
        self.deleted_at.is_none()
    }

    /// The desired keys whose value differs from reported, with the desired values.
    pub fn delta(&self) -> Map<String, Value> {
        match &self.desired {
            Some(desired) => delta(desired, self.reported.as_ref()),
            None => Map::new(),
        }
    }

    /// The `/get/accepted` (and GetThingShadow) document, `delta` included when non-empty.
    pub fn render(&self, now: i64, client_token: Option<&str>) -> Value {
        let mut document = self.snapshot();
        let delta = self.delta();
        // The delta's metadata is not repeated in the GET document.
        if !delta.is_empty() {
            document["state"]["delta"] = Value::Object(delta);
        }
        document["timestamp"] = json!(now);
        if let Some(token) = client_token {
            document["clientToken"] = json!(token);
        }
        document
    }

    /// `{state:{desired,reported}, metadata:{desired,reported}, version}` as in
    /// `/update/documents`.
    pub fn snapshot(&self) -> Value {
        let mut state = Map::new();
        let mut metadata = Map::new();
        if let Some(d) = &self.desired {
            state.insert("desired".into(), Value::Object(d.clone()));
            metadata.insert(
                "desired".into(),
                Value::Object(self.desired_metadata.clone().unwrap_or_default()),
            );
        }
        if let Some(r) = &self.reported {
            state.insert("reported".into(), Value::Object(r.clone()));
            metadata.insert(
                "reported".into(),
                Value::Object(self.reported_metadata.clone().unwrap_or_default()),
            );
        }
        json!({ "state": state, "metadata": metadata, "version": self.version })
    }

    /// The `/update/delta` message, when desired and reported differ.
    pub fn delta_message(&self, now: i64, client_token: Option<&str>) -> Option<Value> {
        let delta = self.delta();
        if delta.is_empty() {
            return None;
        }
        let metadata = delta_metadata(&delta, self.desired_metadata.as_ref());
        let mut message = json!({
            "state": delta,
            "metadata": metadata,
            "version": self.version,
            "timestamp": now,
        });
        if let Some(token) = client_token {
            message["clientToken"] = json!(token);
        }
        Some(message)
    }
}

/// How an update touches one of `desired` / `reported`.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionChange {
    Untouched,
    /// `"desired": null`: the whole section goes.
    Remove,
    Merge(Map<String, Value>),
}

/// A validated update request.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    /// The `state` node as sent (echoed in `/update/accepted`).
    pub state: Map<String, Value>,
    pub desired: SectionChange,
    pub reported: SectionChange,
    pub client_token: Option<String>,
    pub version: Option<i64>,
}

/// The `clientToken` of a request payload, when it is a valid one (for echoing in errors).
pub fn client_token_of(payload: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    match value.get("clientToken") {
        Some(Value::String(s)) if s.len() <= MAX_CLIENT_TOKEN_BYTES => Some(s.clone()),
        _ => None,
    }
}

/// Parses the optional `clientToken` of a get or delete request (any payload is accepted;
/// only a JSON object's valid token is used).
pub fn parse_client_token(payload: &[u8]) -> Result<Option<String>, ShadowError> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(payload) else {
        return Ok(None);
    };
    token_field(&body)
}

fn token_field(body: &Map<String, Value>) -> Result<Option<String>, ShadowError> {
    match body.get("clientToken") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_CLIENT_TOKEN_BYTES => Ok(Some(s.clone())),
        Some(_) => Err(ShadowError::bad("Invalid clientToken")),
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn array_holds_null(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.values().any(array_holds_null),
        Value::Array(items) => items.iter().any(|v| v.is_null() || array_holds_null(v)),
        _ => false,
    }
}

/// Parses and validates an update request payload.
pub fn parse_update(payload: &[u8]) -> Result<UpdateRequest, ShadowError> {
    if std::str::from_utf8(payload).is_err() {
        return Err(ShadowError::new(
            415,
            "Unsupported documented encoding; supported encoding is UTF-8",
        ));
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(payload) else {
        return Err(ShadowError::bad("Invalid JSON"));
    };
    let client_token = token_field(&body)?;
    let version = match body.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .filter(|v| *v >= 0)
                .ok_or_else(|| ShadowError::bad("Invalid version"))?,
        ),
        Some(_) => return Err(ShadowError::bad("Invalid version")),
    };
    let state = match body.get("state") {
        None => return Err(ShadowError::bad("Missing required node: state")),
        Some(Value::Object(state)) => state.clone(),
        Some(_) => return Err(ShadowError::bad("State node must be an object")),
    };
    if state.keys().any(|k| k != "desired" && k != "reported") {
        return Err(ShadowError::bad("State contains an invalid node"));
    }
    let section = |name: &str, wrong: &str| -> Result<SectionChange, ShadowError> {
        match state.get(name) {
            None => Ok(SectionChange::Untouched),
            Some(Value::Null) => Ok(SectionChange::Remove),
            Some(v @ Value::Object(map)) => {
                if depth(v) > MAX_DEPTH {
                    return Err(ShadowError::bad(
                        "JSON contains too many levels of nesting; maximum is 6",
                    ));
                }
                if array_holds_null(v) {
                    return Err(ShadowError::bad("State contains an invalid node"));
                }
                Ok(SectionChange::Merge(map.clone()))
            }
            Some(_) => Err(ShadowError::bad(wrong)),
        }
    };
    let desired = section("desired", "Desired node must be an object")?;
    let reported = section("reported", "Reported node must be an object")?;
    if serde_json::to_vec(&state).map(|b| b.len()).unwrap_or(0) > MAX_STATE_BYTES {
        return Err(ShadowError::new(
            413,
            "The payload exceeds the maximum size allowed",
        ));
    }
    Ok(UpdateRequest {
        state,
        desired,
        reported,
        client_token,
        version,
    })
}

/// The metadata mirroring `value`: `{"timestamp":t}` at each leaf, per element in arrays.
pub fn metadata_of(value: &Value, t: i64) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), metadata_of(v, t)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| metadata_of(v, t)).collect()),
        _ => json!({ "timestamp": t }),
    }
}

/// Merges `patch` into `state` (and its `metadata`) at time `t`.
fn merge(
    state: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    t: i64,
) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                state.remove(key);
                metadata.remove(key);
            }
            Value::Object(inner) => {
                let was_object = matches!(state.get(key), Some(Value::Object(_)));
                if !was_object {
                    state.insert(key.clone(), Value::Object(Map::new()));
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                if !matches!(metadata.get(key), Some(Value::Object(_))) {
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                let (Some(Value::Object(s)), Some(Value::Object(m))) =
                    (state.get_mut(key), metadata.get_mut(key))
                else {
                    continue;
                };
                merge(s, m, inner, t);
                // An object emptied by deletions disappears; an explicit `{}` stays.
                if s.is_empty() && !inner.is_empty() {
                    state.remove(key);
                    metadata.remove(key);
                }
            }
            other => {
                state.insert(key.clone(), other.clone());
                metadata.insert(key.clone(), metadata_of(other, t));
            }
        }
    }
}

fn apply_section(
    state: &mut Option<Map<String, Value>>,
    metadata: &mut Option<Map<String, Value>>,
    change: &SectionChange,
    t: i64,
) {
    match change {
        SectionChange::Untouched => {}
        SectionChange::Remove => {
            *state = None;
            *metadata = None;
        }
        SectionChange::Merge(patch) => {
            let mut s = state.take().unwrap_or_default();
            let mut m = metadata.take().unwrap_or_default();
            merge(&mut s, &mut m, patch, t);
            // A section is present only while it holds keys.
            if !s.is_empty() {
                *state = Some(s);
                *metadata = Some(m);
            }
        }
    }
}

/// The desired keys that `reported` lacks or holds with a different value; objects are
/// compared key by key, everything else (arrays included) as whole values.
pub fn delta(
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, want) in desired {
        match (want, reported.and_then(|r| r.get(key))) {
            (_, None) => {
                out.insert(key.clone(), want.clone());
            }
            (Value::Object(w), Some(Value::Object(have))) => {
                let inner = delta(w, Some(have));
                if !inner.is_empty() {
                    out.insert(key.clone(), Value::Object(inner));
                }
            }
            (_, Some(have)) => {
                if want != have {
                    out.insert(key.clone(), want.clone());
                }
            }
        }
    }
    out
}

/// The desired metadata of the keys in `delta`.
pub fn delta_metadata(
    delta: &Map<String, Value>,
    metadata: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in delta {
        let Some(meta) = metadata.and_then(|m| m.get(key)) else {
            continue;
        };
        match (value, meta) {
            (Value::Object(d), Value::Object(m)) => {
                out.insert(key.clone(), Value::Object(delta_metadata(d, Some(m))));
            }
            _ => {
                out.insert(key.clone(), meta.clone());
            }
        }
    }
    out
}

/// What an accepted update produced.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The shadow before the update, when it existed.
    pub previous: Option<StoredShadow>,
    pub current: StoredShadow,
    /// The `/update/accepted` document (also UpdateThingShadow's response).
    pub accepted: Value,
    /// The `/update/delta` message, when one is due.
    pub delta: Option<Value>,
    /// The `/update/documents` message.
    pub documents: Value,
}

/// The version a (possibly deleted) shadow continues from at `now`.
fn base_version(stored: Option<&StoredShadow>, now: i64) -> i64 {
    match stored {
        None => 0,
        Some(s) => match s.deleted_at {
            Some(at) if now - at > VERSION_MEMORY_SECS => 0,
            _ => s.version,
        },
    }
}

/// Applies `request` to `stored` at epoch second `now`.
pub fn apply_update(
    stored: Option<&StoredShadow>,
    request: &UpdateRequest,
    now: i64,
) -> Result<Applied, ShadowError> {
    let version = base_version(stored, now);
    if let Some(expected) = request.version {
        if expected != version {
            return Err(ShadowError::new(409, "Version conflict"));
        }
    }
    let previous = stored.filter(|s| s.exists()).cloned();
    let mut current = previous.clone().unwrap_or_default();
    apply_section(
        &mut current.desired,
        &mut current.desired_metadata,
        &request.desired,
        now,
    );
    apply_section(
        &mut current.reported,
        &mut current.reported_metadata,
        &request.reported,
        now,
    );
    let size =
        serde_json::to_vec(&json!({ "desired": current.desired, "reported": current.reported }))
            .map(|b| b.len())
            .unwrap_or(0);
    if size > MAX_STATE_BYTES {
        return Err(ShadowError::new(
            413,
            "The payload exceeds the maximum size allowed",
        ));
    }
    current.version = version + 1;
    current.timestamp = now;
    current.deleted_at = None;

    let token = request.client_token.as_deref();
    let mut accepted = json!({
        "state": request.state,
        "metadata": metadata_of(&Value::Object(request.state.clone()), now),
        "version": current.version,
        "timestamp": now,
    });
    if let Some(t) = token {
        accepted["clientToken"] = json!(t);
    }
    // A delta goes out when the request set desired values and desired still differs
    // from reported (deleting desired keys alone sends none).
    let sets_desired =
        matches!(&request.desired, SectionChange::Merge(m) if m.values().any(|v| !v.is_null()));
    let delta = if sets_desired {
        current.delta_message(now, token)
    } else {
        None
    };
    let mut documents = json!({ "current": current.snapshot(), "timestamp": now });
    if let Some(p) = &previous {
        documents["previous"] = p.snapshot();
    }
    if let Some(t) = token {
        documents["clientToken"] = json!(t);
    }
    Ok(Applied {
        previous,
        current,
        accepted,
        delta,
        documents,
    })
}

/// Deletes `stored` at `now`: the tombstone to store and the `/delete/accepted` document.
pub fn apply_delete(
    key: &ShadowKey,
    stored: Option<&StoredShadow>,
    now: i64,
    client_token: Option<&str>,
) -> Result<(StoredShadow, Value), ShadowError> {
    let Some(existing) = stored.filter(|s| s.exists()) else {
        return Err(key.not_found());
    };
    let tombstone = StoredShadow {
        version: existing.version,
        timestamp: now,
        deleted_at: Some(now),
        ..Default::default()
    };
    let mut body = json!({ "version": existing.version, "timestamp": now });
    if let Some(t) = client_token {
        body["clientToken"] = json!(t);
    }
    Ok((tombstone, body))
}
