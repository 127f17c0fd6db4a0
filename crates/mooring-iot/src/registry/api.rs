//! The registry's `iot` operations: one function per operation (parse the request, call
//! [`ThingRegistry`], render AWS's response), and their rows in the routing table.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{json_response, parse_json_body, AwsError, AwsRequest, Protocol};
use serde::Deserialize;
use serde_json::json;

use super::things::{NewThing, RegistryError, Thing, ThingFilter, ThingUpdate};
use crate::api::{empty_ok, IotState, OperationResult, PathParams, RouteRow};

/// The registry operations' rows of the `iot` routing table.
pub fn routes() -> Vec<RouteRow> {
    vec![
        (Method::GET, "/things", "ListThings", list_things),
        (
            Method::POST,
            "/things/{thingName}",
            "CreateThing",
            create_thing,
        ),
        (
            Method::GET,
            "/things/{thingName}",
            "DescribeThing",
            describe_thing,
        ),
        (
            Method::PATCH,
            "/things/{thingName}",
            "UpdateThing",
            update_thing,
        ),
        (
            Method::DELETE,
            "/things/{thingName}",
            "DeleteThing",
            delete_thing,
        ),
    ]
}

/// Renders a registry error as AWS IoT answers it.
pub fn registry_error(e: RegistryError) -> AwsError {
    match e {
        RegistryError::InvalidRequest(m) => AwsError::client("InvalidRequestException", m),
        RegistryError::NotFound(m) => {
            AwsError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", m)
        }
        RegistryError::AlreadyExists { message, id, arn } => AwsError::new(
            StatusCode::CONFLICT,
            "ResourceAlreadyExistsException",
            message,
        )
        .with("resourceId", id)
        .with("resourceArn", arn),
        RegistryError::VersionConflict(m) => {
            AwsError::new(StatusCode::CONFLICT, "VersionConflictException", m)
        }
        RegistryError::Store(m) => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            m,
        ),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AttributePayload {
    attributes: Option<BTreeMap<String, String>>,
    #[serde(default)]
    merge: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreateThingRequest {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    billing_group_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UpdateThingRequest {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    expected_version: Option<i64>,
    #[serde(default)]
    remove_thing_type: bool,
}

pub(crate) fn body_or_default<T: serde::de::DeserializeOwned + Default>(
    request: &AwsRequest,
) -> Result<T, AwsError> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json_body(&request.body)
    }
}

fn create_thing(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: CreateThingRequest = body_or_default(&request)?;
        let thing = state
            .things
            .create(
                params.get("thingName"),
                NewThing {
                    thing_type_name: body.thing_type_name,
                    attributes: body
                        .attribute_payload
                        .and_then(|p| p.attributes)
                        .unwrap_or_default(),
                    billing_group_name: body.billing_group_name,
                },
            )
            .await
            .map_err(registry_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "thingName": thing.name, "thingArn": thing.arn, "thingId": thing.id }),
        ))
    })
}

/// The DescribeThing shape.
pub fn render_thing(thing: &Thing) -> serde_json::Value {
    let mut out = json!({
        "defaultClientId": thing.name,
        "thingName": thing.name,
        "thingId": thing.id,
        "thingArn": thing.arn,
        "attributes": thing.attributes,
        "version": thing.version,
    });
    if let Some(t) = &thing.thing_type_name {
        out["thingTypeName"] = json!(t);
    }
    if let Some(b) = &thing.billing_group_name {
        out["billingGroupName"] = json!(b);
    }
    out
}

fn describe_thing(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = state
            .things
            .describe(params.get("thingName"))
            .await
            .map_err(registry_error)?;
        Ok(json_response(Protocol::RestJson1, &render_thing(&thing)))
    })
}

fn update_thing(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: UpdateThingRequest = body_or_default(&request)?;
        let (attributes, merge) = match body.attribute_payload {
            Some(p) => (p.attributes, p.merge),
            None => (None, false),
        };
        state
            .things
            .update(
                params.get("thingName"),
                ThingUpdate {
                    thing_type_name: body.thing_type_name,
                    remove_thing_type: body.remove_thing_type,
                    attributes,
                    merge,
                    expected_version: body.expected_version,
                },
            )
            .await
            .map_err(registry_error)?;
        empty_ok()
    })
}

fn delete_thing(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let expected = match request.query_param("expectedVersion") {
            None => None,
            Some(v) => Some(v.parse::<i64>().map_err(|_| {
                AwsError::client(
                    "InvalidRequestException",
                    format!("expectedVersion must be a number, not '{v}'"),
                )
            })?),
        };
        state
            .things
            .delete(params.get("thingName"), expected)
            .await
            .map_err(registry_error)?;
        empty_ok()
    })
}

fn list_things(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let max_results = match request.query_param("maxResults") {
            None => 50,
            Some(m) => match m.parse::<usize>() {
                Ok(n @ 1..=250) => n,
                _ => {
                    return Err(AwsError::client(
                        "InvalidRequestException",
                        format!("1 validation error detected: Value '{m}' at 'maxResults' failed to satisfy constraint: Member must have value between 1 and 250"),
                    ))
                }
            },
        };
        let filter = ThingFilter {
            attribute_name: request.query_param("attributeName"),
            attribute_value: request.query_param("attributeValue"),
            use_prefix_attribute_value: request.query_param("usePrefixAttributeValue").as_deref()
                == Some("true"),
            thing_type_name: request.query_param("thingTypeName"),
        };
        let page = state
            .things
            .list(filter, max_results, request.query_param("nextToken"))
            .await
            .map_err(registry_error)?;
        let things: Vec<serde_json::Value> = page
            .things
            .iter()
            .map(|t| {
                let mut item = json!({
                    "thingName": t.name,
                    "thingArn": t.arn,
                    "attributes": t.attributes,
                    "version": t.version,
                });
                if let Some(ty) = &t.thing_type_name {
                    item["thingTypeName"] = json!(ty);
                }
                item
            })
            .collect();
        let mut body = json!({ "things": things });
        if let Some(token) = page.next_token {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}
