//! The thing group `iot` operations: one function per operation (parse, call
//! [`ThingGroupRegistry`](super::groups::ThingGroupRegistry), render AWS's response), and
//! their rows in the routing table.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::Method;
use futures::future::BoxFuture;
use mooring_aws::{json_response, AwsError, AwsRequest, Protocol};
use serde::Deserialize;
use serde_json::json;

use super::api::{body_or_default, registry_error};
use super::groups::NewThingGroup;
use crate::api::{empty_ok, IotState, OperationResult, PathParams, RouteRow};

/// The thing group operations' rows of the `iot` routing table.
pub fn routes() -> Vec<RouteRow> {
    vec![
        (
            Method::GET,
            "/thing-groups",
            "ListThingGroups",
            list_thing_groups,
        ),
        (
            Method::POST,
            "/thing-groups/{thingGroupName}",
            "CreateThingGroup",
            create_thing_group,
        ),
        (
            Method::GET,
            "/thing-groups/{thingGroupName}",
            "DescribeThingGroup",
            describe_thing_group,
        ),
        (
            Method::DELETE,
            "/thing-groups/{thingGroupName}",
            "DeleteThingGroup",
            delete_thing_group,
        ),
        (
            Method::PUT,
            "/thing-groups/addThingToThingGroup",
            "AddThingToThingGroup",
            add_thing_to_thing_group,
        ),
        (
            Method::PUT,
            "/thing-groups/removeThingFromThingGroup",
            "RemoveThingFromThingGroup",
            remove_thing_from_thing_group,
        ),
        (
            Method::GET,
            "/thing-groups/{thingGroupName}/things",
            "ListThingsInThingGroup",
            list_things_in_thing_group,
        ),
        (
            Method::GET,
            "/things/{thingName}/thing-groups",
            "ListThingGroupsForThing",
            list_thing_groups_for_thing,
        ),
    ]
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AttributePayload {
    attributes: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ThingGroupProperties {
    thing_group_description: Option<String>,
    attribute_payload: Option<AttributePayload>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreateThingGroupRequest {
    parent_group_name: Option<String>,
    thing_group_properties: Option<ThingGroupProperties>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MembershipRequest {
    thing_group_name: Option<String>,
    thing_group_arn: Option<String>,
    thing_name: Option<String>,
    thing_arn: Option<String>,
}

impl MembershipRequest {
    /// The group and thing names, from names or ARNs.
    fn names(&self) -> Result<(String, String), AwsError> {
        let from_arn = |arn: &Option<String>, kind: &str| {
            arn.as_deref()
                .and_then(|a| a.split_once(&format!(":{kind}/")))
                .map(|(_, name)| name.to_string())
        };
        let group = self
            .thing_group_name
            .clone()
            .or_else(|| from_arn(&self.thing_group_arn, "thinggroup"));
        let thing = self
            .thing_name
            .clone()
            .or_else(|| from_arn(&self.thing_arn, "thing"));
        match (group, thing) {
            (Some(g), Some(t)) => Ok((g, t)),
            _ => Err(AwsError::client(
                "InvalidRequestException",
                "Both a thing group (thingGroupName or thingGroupArn) and a thing (thingName or thingArn) are required",
            )),
        }
    }
}

fn create_thing_group(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: CreateThingGroupRequest = body_or_default(&request)?;
        let properties = body.thing_group_properties.unwrap_or_default();
        let group = state
            .groups
            .create(
                params.get("thingGroupName"),
                NewThingGroup {
                    parent: body.parent_group_name,
                    description: properties.thing_group_description,
                    attributes: properties
                        .attribute_payload
                        .and_then(|p| p.attributes)
                        .unwrap_or_default(),
                },
            )
            .await
            .map_err(registry_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "thingGroupName": group.name,
                "thingGroupArn": group.arn,
                "thingGroupId": group.id,
            }),
        ))
    })
}

fn describe_thing_group(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let name = params.get("thingGroupName");
        let group = state.groups.describe(name).await.map_err(registry_error)?;
        let ancestors = state.groups.ancestors(name).await.map_err(registry_error)?;
        let mut properties = json!({ "attributePayload": { "attributes": group.attributes } });
        if let Some(d) = &group.description {
            properties["thingGroupDescription"] = json!(d);
        }
        let mut metadata = json!({ "creationDate": group.created_ms as f64 / 1000.0 });
        if let Some(p) = &group.parent {
            metadata["parentGroupName"] = json!(p);
            metadata["rootToParentThingGroups"] = json!(ancestors
                .iter()
                .map(|g| json!({ "groupName": g.name, "groupArn": g.arn }))
                .collect::<Vec<_>>());
        }
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "thingGroupName": group.name,
                "thingGroupId": group.id,
                "thingGroupArn": group.arn,
                "version": group.version,
                "thingGroupProperties": properties,
                "thingGroupMetadata": metadata,
            }),
        ))
    })
}

fn delete_thing_group(
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
            .groups
            .delete(params.get("thingGroupName"), expected)
            .await
            .map_err(registry_error)?;
        empty_ok()
    })
}

fn add_thing_to_thing_group(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: MembershipRequest = body_or_default(&request)?;
        let (group, thing) = body.names()?;
        state
            .groups
            .add_thing(&group, &thing)
            .await
            .map_err(registry_error)?;
        empty_ok()
    })
}

fn remove_thing_from_thing_group(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: MembershipRequest = body_or_default(&request)?;
        let (group, thing) = body.names()?;
        state
            .groups
            .remove_thing(&group, &thing)
            .await
            .map_err(registry_error)?;
        empty_ok()
    })
}

/// Pagination of a name-ordered list: `maxResults` (1-250, default 50) and a `nextToken`
/// that is the last name of the previous page.
pub(crate) fn paginate<T: Clone>(
    request: &AwsRequest,
    items: &[T],
    key: impl Fn(&T) -> String,
) -> Result<(Vec<T>, Option<String>), AwsError> {
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
    let after = request.query_param("nextToken").unwrap_or_default();
    let rest: Vec<T> = items
        .iter()
        .filter(|i| after.is_empty() || key(i) > after)
        .cloned()
        .collect();
    let next = (rest.len() > max_results).then(|| key(&rest[max_results - 1]));
    Ok((rest.into_iter().take(max_results).collect(), next))
}

fn list_thing_groups(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let groups = state
            .groups
            .list(
                request.query_param("parentGroup"),
                request.query_param("namePrefixFilter"),
                request.query_param("recursive").as_deref() != Some("false"),
            )
            .await
            .map_err(registry_error)?;
        let (page, next) = paginate(&request, &groups, |g| g.name.clone())?;
        let mut body = json!({
            "thingGroups": page
                .iter()
                .map(|g| json!({ "groupName": g.name, "groupArn": g.arn }))
                .collect::<Vec<_>>()
        });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn list_things_in_thing_group(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let things = state
            .groups
            .things_in(
                params.get("thingGroupName"),
                request.query_param("recursive").as_deref() == Some("true"),
            )
            .await
            .map_err(registry_error)?;
        let (page, next) = paginate(&request, &things, Clone::clone)?;
        let mut body = json!({ "things": page });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn list_thing_groups_for_thing(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let thing = params.get("thingName");
        state.things.describe(thing).await.map_err(registry_error)?;
        let groups = state
            .groups
            .groups_of_thing(thing)
            .await
            .map_err(registry_error)?;
        let (page, next) = paginate(&request, &groups, Clone::clone)?;
        let mut body = json!({
            "thingGroups": page
                .iter()
                .map(|g| json!({ "groupName": g, "groupArn": state.groups.arn(g) }))
                .collect::<Vec<_>>()
        });
        if let Some(token) = next {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}
