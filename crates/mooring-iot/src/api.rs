//! The `iot` REST operations: one function per operation (parse, call the model, render),
//! and the table of method and path patterns that routes requests to them.
//!
//! The table is the one place an operation is registered: each part of the control plane
//! (rules here, things in [`crate::registry`], and so on) contributes its own rows, and
//! [`routes`] joins them. When two patterns match a path, the one with more literal
//! segments wins, so `/thing-groups/addThingToThingGroup` beats `/thing-groups/{name}`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{json_response, parse_json_body, AwsError, AwsRequest, Protocol};
use serde_json::json;

use crate::model::{parse_tagging, RuleError, StoredRule, TopicRulePayload, TopicRules};

/// What the operations share.
pub struct IotState {
    pub rules: TopicRules,
    pub things: crate::registry::things::ThingRegistry,
    pub security: crate::security::Security,
    pub security_settings: std::sync::Arc<crate::security::SecuritySettings>,
    pub groups: crate::registry::groups::ThingGroupRegistry,
    pub jobs: Arc<crate::jobs::Jobs>,
}

/// Path parameters captured by a route (`{ruleName}` and friends), percent-decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathParams(pub Vec<(String, String)>);

impl PathParams {
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

pub type OperationResult = Result<Response<Body>, AwsError>;
pub type Handler = fn(Arc<IotState>, AwsRequest, PathParams) -> BoxFuture<'static, OperationResult>;
/// One row of a routing table: method, path pattern, operation name, handler.
pub type RouteRow = (Method, &'static str, &'static str, Handler);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(&'static str),
    Param(&'static str),
}

/// One row of the routing table.
pub struct Route {
    pub method: Method,
    pub operation: &'static str,
    pub handler: Handler,
    segments: Vec<Segment>,
}

/// Method and path patterns to operations.
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(table: Vec<RouteRow>) -> Router {
        let routes = table
            .into_iter()
            .map(|(method, pattern, operation, handler)| Route {
                method,
                operation,
                handler,
                segments: pattern
                    .trim_matches('/')
                    .split('/')
                    .map(
                        |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                            Some(name) => Segment::Param(name),
                            None => Segment::Literal(s),
                        },
                    )
                    .collect(),
            })
            .collect();
        Router { routes }
    }

    /// The route for `method` and raw `path`, with its parameters.
    pub fn find(&self, method: &Method, path: &str) -> Option<(&Route, PathParams)> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut best: Option<(usize, &Route, PathParams)> = None;
        'routes: for route in &self.routes {
            if route.method != *method || route.segments.len() != parts.len() {
                continue;
            }
            let mut params = Vec::new();
            for (segment, part) in route.segments.iter().zip(&parts) {
                match segment {
                    Segment::Literal(l) if l == part => {}
                    Segment::Literal(_) => continue 'routes,
                    Segment::Param(name) => {
                        if part.is_empty() {
                            continue 'routes;
                        }
                        let decoded = percent_encoding::percent_decode_str(part)
                            .decode_utf8_lossy()
                            .into_owned();
                        params.push((name.to_string(), decoded));
                    }
                }
            }
            let literals = route.segments.len() - params.len();
            if best.as_ref().is_none_or(|(b, _, _)| literals > *b) {
                best = Some((literals, route, PathParams(params)));
            }
        }
        best.map(|(_, route, params)| (route, params))
    }
}

/// The operations of the `iot` service that Mooring implements.
pub fn routes() -> Router {
    let mut table = rule_routes();
    table.extend(crate::registry::api::routes());
    table.extend(crate::security::api::routes());
    table.extend(crate::registry::group_api::routes());
    table.extend(crate::jobs::api::routes());
    Router::new(table)
}

/// The topic rule operations.
fn rule_routes() -> Vec<RouteRow> {
    vec![
        (Method::GET, "/rules", "ListTopicRules", list_topic_rules),
        (
            Method::POST,
            "/rules/{ruleName}/enable",
            "EnableTopicRule",
            enable_topic_rule,
        ),
        (
            Method::POST,
            "/rules/{ruleName}/disable",
            "DisableTopicRule",
            disable_topic_rule,
        ),
        (
            Method::POST,
            "/rules/{ruleName}",
            "CreateTopicRule",
            create_topic_rule,
        ),
        (
            Method::GET,
            "/rules/{ruleName}",
            "GetTopicRule",
            get_topic_rule,
        ),
        (
            Method::PATCH,
            "/rules/{ruleName}",
            "ReplaceTopicRule",
            replace_topic_rule,
        ),
        (
            Method::DELETE,
            "/rules/{ruleName}",
            "DeleteTopicRule",
            delete_topic_rule,
        ),
    ]
}

/// Renders a model error as AWS IoT answers it.
pub fn rule_error(e: RuleError) -> AwsError {
    match e {
        RuleError::SqlParse(m) => AwsError::client("SqlParseException", m),
        RuleError::InvalidRequest(m) => AwsError::client("InvalidRequestException", m),
        RuleError::AlreadyExists(name) => AwsError::new(
            StatusCode::CONFLICT,
            "ResourceAlreadyExistsException",
            format!("Rule {name} already exists"),
        )
        .with("resourceId", name),
        // AWS answers a missing rule with UnauthorizedException (there is no
        // ResourceNotFoundException in these operations' model).
        RuleError::NotFound(name) => AwsError::new(
            StatusCode::UNAUTHORIZED,
            "UnauthorizedException",
            format!("Rule {name} does not exist or you are not authorized to access it"),
        ),
        RuleError::Store(m) => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            m,
        ),
    }
}

pub fn empty_ok() -> OperationResult {
    Ok(json_response(Protocol::RestJson1, &json!({})))
}

fn parse_payload(request: &AwsRequest) -> Result<TopicRulePayload, AwsError> {
    let payload: TopicRulePayload = parse_json_body(&request.body)?;
    if payload.sql.is_none() {
        return Err(AwsError::client(
            "InvalidRequestException",
            "1 validation error detected: Value null at 'topicRulePayload.sql' failed to satisfy constraint: Member must not be null",
        ));
    }
    if payload.actions.is_none() {
        return Err(AwsError::client(
            "InvalidRequestException",
            "1 validation error detected: Value null at 'topicRulePayload.actions' failed to satisfy constraint: Member must not be null",
        ));
    }
    Ok(payload)
}

fn create_topic_rule(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let payload = parse_payload(&request)?;
        let tags = request
            .header("x-amz-tagging")
            .map(parse_tagging)
            .unwrap_or_default();
        state
            .rules
            .create(params.get("ruleName"), payload, tags)
            .await
            .map_err(rule_error)?;
        empty_ok()
    })
}

/// The `TopicRule` shape of GetTopicRule.
pub fn render_rule(rule: &StoredRule) -> serde_json::Value {
    let p = &rule.payload;
    let mut out = serde_json::Map::new();
    out.insert("ruleName".into(), json!(rule.name));
    out.insert("sql".into(), json!(p.sql));
    if let Some(d) = &p.description {
        out.insert("description".into(), json!(d));
    }
    out.insert("createdAt".into(), json!(rule.created_at));
    out.insert(
        "actions".into(),
        json!(p.actions.clone().unwrap_or_default()),
    );
    out.insert("ruleDisabled".into(), json!(rule.disabled()));
    out.insert(
        "awsIotSqlVersion".into(),
        json!(rule.sql_version().as_str()),
    );
    if let Some(e) = &p.error_action {
        out.insert("errorAction".into(), e.clone());
    }
    serde_json::Value::Object(out)
}

fn get_topic_rule(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let rule = state
            .rules
            .get(params.get("ruleName"))
            .await
            .map_err(rule_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "ruleArn": rule.arn, "rule": render_rule(&rule) }),
        ))
    })
}

fn list_topic_rules(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let max_results = match request.query_param("maxResults") {
            None => 10_000,
            Some(m) => match m.parse::<usize>() {
                Ok(n @ 1..=10_000) => n,
                _ => {
                    return Err(AwsError::client(
                        "InvalidRequestException",
                        format!("1 validation error detected: Value '{m}' at 'maxResults' failed to satisfy constraint: Member must have value between 1 and 10000"),
                    ))
                }
            },
        };
        let disabled = match request.query_param("ruleDisabled").as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                return Err(AwsError::client(
                    "InvalidRequestException",
                    format!("ruleDisabled must be true or false, not '{other}'"),
                ))
            }
        };
        let page = state
            .rules
            .list(
                request.query_param("topic"),
                disabled,
                max_results,
                request.query_param("nextToken"),
            )
            .await
            .map_err(rule_error)?;
        let rules: Vec<serde_json::Value> = page
            .rules
            .iter()
            .map(|r| {
                let mut item = serde_json::Map::new();
                item.insert("ruleArn".into(), json!(r.arn));
                item.insert("ruleName".into(), json!(r.name));
                if let Some(pattern) = r.topic_pattern() {
                    item.insert("topicPattern".into(), json!(pattern));
                }
                item.insert("createdAt".into(), json!(r.created_at));
                item.insert("ruleDisabled".into(), json!(r.disabled()));
                serde_json::Value::Object(item)
            })
            .collect();
        let mut body = json!({ "rules": rules });
        if let Some(token) = page.next_token {
            body["nextToken"] = json!(token);
        }
        Ok(json_response(Protocol::RestJson1, &body))
    })
}

fn replace_topic_rule(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let payload = parse_payload(&request)?;
        state
            .rules
            .replace(params.get("ruleName"), payload)
            .await
            .map_err(rule_error)?;
        empty_ok()
    })
}

fn delete_topic_rule(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .rules
            .delete(params.get("ruleName"))
            .await
            .map_err(rule_error)?;
        empty_ok()
    })
}

fn enable_topic_rule(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .rules
            .set_disabled(params.get("ruleName"), false)
            .await
            .map_err(rule_error)?;
        empty_ok()
    })
}

fn disable_topic_rule(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .rules
            .set_disabled(params.get("ruleName"), true)
            .await
            .map_err(rule_error)?;
        empty_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_routes_by_method_and_path() {
        let router = routes();
        let find = |m: Method, p: &str| router.find(&m, p).map(|(r, params)| (r.operation, params));
        assert_eq!(find(Method::GET, "/rules").unwrap().0, "ListTopicRules");
        let (op, params) = find(Method::POST, "/rules/my_rule").unwrap();
        assert_eq!(op, "CreateTopicRule");
        assert_eq!(params.get("ruleName"), "my_rule");
        assert_eq!(
            find(Method::POST, "/rules/r/enable").unwrap().0,
            "EnableTopicRule"
        );
        assert_eq!(
            find(Method::POST, "/rules/r/disable").unwrap().0,
            "DisableTopicRule"
        );
        assert_eq!(
            find(Method::PATCH, "/rules/r").unwrap().0,
            "ReplaceTopicRule"
        );
        assert_eq!(
            find(Method::DELETE, "/rules/r").unwrap().0,
            "DeleteTopicRule"
        );
        assert_eq!(
            find(Method::GET, "/rules/a%20b").unwrap().1.get("ruleName"),
            "a b"
        );
        assert!(find(Method::PUT, "/rules/r").is_none());
        assert_eq!(find(Method::GET, "/things").unwrap().0, "ListThings");
        assert!(find(Method::GET, "/unknown").is_none());
        assert!(find(Method::POST, "/rules/r/other").is_none());
    }
}
