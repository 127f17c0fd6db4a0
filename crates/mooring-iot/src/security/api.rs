//! The security operations of the `iot` API: one function per operation (parse the
//! request, call [`Security`](super::model::Security), render AWS's response), and their rows
//! in the routing table.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use futures::future::BoxFuture;
use mooring_aws::{json_response, parse_json_body, AwsError, AwsRequest, Protocol};
use serde::Deserialize;
use serde_json::json;

use super::certificates::CertificateStatus;
use super::model::{Certificate, Page, Policy, SecurityError};
use crate::api::{empty_ok, IotState, OperationResult, PathParams, RouteRow};

/// The security operations' rows of the `iot` routing table.
pub fn routes() -> Vec<RouteRow> {
    vec![
        (
            Method::POST,
            "/keys-and-certificate",
            "CreateKeysAndCertificate",
            create_keys_and_certificate,
        ),
        (
            Method::POST,
            "/certificate/register",
            "RegisterCertificate",
            register_certificate,
        ),
        (
            Method::GET,
            "/certificates",
            "ListCertificates",
            list_certificates,
        ),
        (
            Method::GET,
            "/certificates/{certificateId}",
            "DescribeCertificate",
            describe_certificate,
        ),
        (
            Method::PUT,
            "/certificates/{certificateId}",
            "UpdateCertificate",
            update_certificate,
        ),
        (
            Method::DELETE,
            "/certificates/{certificateId}",
            "DeleteCertificate",
            delete_certificate,
        ),
        (
            Method::PUT,
            "/things/{thingName}/principals",
            "AttachThingPrincipal",
            attach_thing_principal,
        ),
        (
            Method::DELETE,
            "/things/{thingName}/principals",
            "DetachThingPrincipal",
            detach_thing_principal,
        ),
        (
            Method::GET,
            "/things/{thingName}/principals",
            "ListThingPrincipals",
            list_thing_principals,
        ),
        (
            Method::GET,
            "/principals/things",
            "ListPrincipalThings",
            list_principal_things,
        ),
        (Method::GET, "/policies", "ListPolicies", list_policies),
        (
            Method::POST,
            "/policies/{policyName}",
            "CreatePolicy",
            create_policy,
        ),
        (
            Method::GET,
            "/policies/{policyName}",
            "GetPolicy",
            get_policy,
        ),
        (
            Method::DELETE,
            "/policies/{policyName}",
            "DeletePolicy",
            delete_policy,
        ),
        (
            Method::POST,
            "/policies/{policyName}/version",
            "CreatePolicyVersion",
            create_policy_version,
        ),
        (
            Method::GET,
            "/policies/{policyName}/version",
            "ListPolicyVersions",
            list_policy_versions,
        ),
        (
            Method::GET,
            "/policies/{policyName}/version/{policyVersionId}",
            "GetPolicyVersion",
            get_policy_version,
        ),
        (
            Method::PATCH,
            "/policies/{policyName}/version/{policyVersionId}",
            "SetDefaultPolicyVersion",
            set_default_policy_version,
        ),
        (
            Method::DELETE,
            "/policies/{policyName}/version/{policyVersionId}",
            "DeletePolicyVersion",
            delete_policy_version,
        ),
        (
            Method::PUT,
            "/target-policies/{policyName}",
            "AttachPolicy",
            attach_policy,
        ),
        (
            Method::POST,
            "/target-policies/{policyName}",
            "DetachPolicy",
            detach_policy,
        ),
        (
            Method::POST,
            "/attached-policies/{target}",
            "ListAttachedPolicies",
            list_attached_policies,
        ),
        (
            Method::GET,
            "/endpoint",
            "DescribeEndpoint",
            describe_endpoint,
        ),
    ]
}

/// Renders a security error as AWS IoT answers it.
pub fn security_error(e: SecurityError) -> AwsError {
    match e {
        SecurityError::InvalidRequest(m) => AwsError::client("InvalidRequestException", m),
        SecurityError::NotFound(m) => {
            AwsError::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", m)
        }
        SecurityError::AlreadyExists { message, id, arn } => AwsError::new(
            StatusCode::CONFLICT,
            "ResourceAlreadyExistsException",
            message,
        )
        .with("resourceId", id)
        .with("resourceArn", arn),
        SecurityError::MalformedPolicy(m) => AwsError::client("MalformedPolicyException", m),
        SecurityError::CertificateValidation(m) => {
            AwsError::client("CertificateValidationException", m)
        }
        SecurityError::CertificateState(m) => {
            AwsError::new(StatusCode::NOT_ACCEPTABLE, "CertificateStateException", m)
        }
        SecurityError::DeleteConflict(m) => {
            AwsError::new(StatusCode::CONFLICT, "DeleteConflictException", m)
        }
        SecurityError::LimitExceeded(m) => {
            AwsError::new(StatusCode::GONE, "LimitExceededException", m)
        }
        SecurityError::VersionsLimitExceeded(m) => {
            AwsError::new(StatusCode::CONFLICT, "VersionsLimitExceededException", m)
        }
        SecurityError::Internal(m) => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            m,
        ),
    }
}

/// Epoch seconds with a fraction, as rest-json renders timestamps.
fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn bool_query(request: &AwsRequest, name: &str) -> Result<Option<bool>, AwsError> {
    match request.query_param(name).as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(AwsError::client(
            "InvalidRequestException",
            format!("{name} must be true or false, not '{other}'"),
        )),
    }
}

fn size_query(
    request: &AwsRequest,
    name: &str,
    max: usize,
    default: usize,
) -> Result<usize, AwsError> {
    match request.query_param(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(AwsError::client(
                "InvalidRequestException",
                format!("1 validation error detected: Value '{v}' at '{name}' failed to satisfy constraint: Member must have value between 1 and {max}"),
            )),
        },
    }
}

fn principal_header(request: &AwsRequest) -> String {
    request.header("x-amzn-principal").unwrap_or("").to_string()
}

fn create_keys_and_certificate(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let active = bool_query(&request, "setAsActive")?.unwrap_or(false);
        let (certificate, keys) = state
            .security
            .create_keys_and_certificate(active)
            .await
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "certificateArn": certificate.arn,
                "certificateId": certificate.id,
                "certificatePem": certificate.pem,
                "keyPair": { "PublicKey": keys.public_key_pem, "PrivateKey": keys.private_key_pem },
            }),
        ))
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RegisterCertificateRequest {
    certificate_pem: Option<String>,
    ca_certificate_pem: Option<String>,
    status: Option<String>,
}

fn register_certificate(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: RegisterCertificateRequest = parse_json_body(&request.body)?;
        let Some(pem) = body.certificate_pem.filter(|p| !p.is_empty()) else {
            return Err(AwsError::client(
                "InvalidRequestException",
                "1 validation error detected: Value null at 'certificatePem' failed to satisfy constraint: Member must not be null",
            ));
        };
        let mut status = match body.status.as_deref() {
            None => CertificateStatus::Inactive,
            Some(s) => CertificateStatus::parse(s).ok_or_else(|| {
                AwsError::client(
                    "InvalidRequestException",
                    format!("1 validation error detected: Value '{s}' at 'status' failed to satisfy constraint: Member must satisfy enum value set: [ACTIVE, INACTIVE, REVOKED, PENDING_TRANSFER, REGISTER_INACTIVE, PENDING_ACTIVATION]"),
                )
            })?,
        };
        if bool_query(&request, "setAsActive")? == Some(true) {
            status = CertificateStatus::Active;
        }
        let certificate = state
            .security
            .register_certificate(&pem, body.ca_certificate_pem.as_deref(), status)
            .await
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "certificateArn": certificate.arn, "certificateId": certificate.id }),
        ))
    })
}

fn render_certificate_description(c: &Certificate, account: &str) -> serde_json::Value {
    let mut out = json!({
        "certificateArn": c.arn,
        "certificateId": c.id,
        "status": c.status.as_str(),
        "certificatePem": c.pem,
        "ownedBy": account,
        "creationDate": seconds(c.created_ms),
        "lastModifiedDate": seconds(c.modified_ms),
        "customerVersion": c.customer_version,
        "transferData": {},
        "generationId": c.generation_id,
        "validity": {
            "notBefore": c.facts.not_before,
            "notAfter": c.facts.not_after,
        },
        "certificateMode": "DEFAULT",
    });
    if let Some(ca) = &c.ca_certificate_id {
        out["caCertificateId"] = json!(ca);
    }
    out
}

fn describe_certificate(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let certificate = state
            .security
            .describe_certificate(params.get("certificateId"))
            .map_err(security_error)?;
        let account = state.security.arns().account_id.clone();
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "certificateDescription": render_certificate_description(&certificate, &account) }),
        ))
    })
}

fn update_certificate(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let Some(new_status) = request.query_param("newStatus") else {
            return Err(AwsError::client(
                "InvalidRequestException",
                "1 validation error detected: Value null at 'newStatus' failed to satisfy constraint: Member must not be null",
            ));
        };
        state
            .security
            .update_certificate(params.get("certificateId"), &new_status)
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn delete_certificate(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let force = bool_query(&request, "forceDelete")?.unwrap_or(false);
        state
            .security
            .delete_certificate(params.get("certificateId"), force)
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn page_body<T>(
    key: &str,
    marker_key: &str,
    page: Page<T>,
    render: impl Fn(&T) -> serde_json::Value,
) -> serde_json::Value {
    let items: Vec<serde_json::Value> = page.items.iter().map(render).collect();
    let mut body = json!({ key: items });
    if let Some(next) = page.next {
        body[marker_key] = json!(next);
    }
    body
}

fn list_certificates(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let size = size_query(&request, "pageSize", 250, 25)?;
        let ascending = bool_query(&request, "isAscendingOrder")?.unwrap_or(false);
        let page = state
            .security
            .list_certificates(size, request.query_param("marker").as_deref(), ascending)
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &page_body("certificates", "nextMarker", page, |c| {
                json!({
                    "certificateArn": c.arn,
                    "certificateId": c.id,
                    "status": c.status.as_str(),
                    "certificateMode": "DEFAULT",
                    "creationDate": seconds(c.created_ms),
                })
            }),
        ))
    })
}

fn attach_thing_principal(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .security
            .attach_thing_principal(
                params.get("thingName"),
                &principal_header(&request),
                request.query_param("thingPrincipalType").as_deref(),
            )
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn detach_thing_principal(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .security
            .detach_thing_principal(params.get("thingName"), &principal_header(&request))
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn list_thing_principals(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let size = size_query(&request, "maxResults", 250, 250)?;
        let page = state
            .security
            .list_thing_principals(
                params.get("thingName"),
                size,
                request.query_param("nextToken").as_deref(),
            )
            .await
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &page_body("principals", "nextToken", page, |p| json!(p)),
        ))
    })
}

fn list_principal_things(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let size = size_query(&request, "maxResults", 250, 250)?;
        let page = state
            .security
            .list_principal_things(
                &principal_header(&request),
                size,
                request.query_param("nextToken").as_deref(),
            )
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &page_body("things", "nextToken", page, |t| json!(t)),
        ))
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CreatePolicyRequest {
    policy_document: Option<String>,
}

/// The required `policyDocument` of a CreatePolicy or CreatePolicyVersion body.
fn policy_document_of(request: &AwsRequest) -> Result<String, AwsError> {
    let body: CreatePolicyRequest = parse_json_body(&request.body)?;
    body.policy_document.ok_or_else(|| {
        AwsError::client(
            "InvalidRequestException",
            "1 validation error detected: Value null at 'policyDocument' failed to satisfy constraint: Member must not be null",
        )
    })
}

fn create_policy(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let document = policy_document_of(&request)?;
        let policy = state
            .security
            .create_policy(params.get("policyName"), &document)
            .await
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "policyName": policy.name,
                "policyArn": policy.arn,
                "policyDocument": policy.in_force().document_text,
                "policyVersionId": "1",
            }),
        ))
    })
}

fn get_policy(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let p = state
            .security
            .get_policy(params.get("policyName"))
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "policyName": p.name,
                "policyArn": p.arn,
                "policyDocument": p.in_force().document_text,
                "defaultVersionId": p.default_version.to_string(),
                "creationDate": seconds(p.created_ms),
                "lastModifiedDate": seconds(p.modified_ms),
                "generationId": p.generation_id,
            }),
        ))
    })
}

/// The `policyVersionId` path parameter: a version number.
fn policy_version_id(params: &PathParams) -> Result<u32, AwsError> {
    let id = params.get("policyVersionId");
    id.parse::<u32>().map_err(|_| {
        AwsError::client(
            "InvalidRequestException",
            format!("1 validation error detected: Value '{id}' at 'policyVersionId' failed to satisfy constraint: Member must satisfy regular expression pattern: [0-9]+"),
        )
    })
}

fn create_policy_version(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let document = policy_document_of(&request)?;
        let set_as_default = bool_query(&request, "setAsDefault")?.unwrap_or(false);
        let (id, policy) = state
            .security
            .create_policy_version(params.get("policyName"), &document, set_as_default)
            .await
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "policyArn": policy.arn,
                "policyDocument": document,
                "policyVersionId": id.to_string(),
                "isDefaultVersion": policy.default_version == id,
            }),
        ))
    })
}

fn get_policy_version(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let id = policy_version_id(&params)?;
        let (p, version) = state
            .security
            .get_policy_version(params.get("policyName"), id)
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({
                "policyArn": p.arn,
                "policyName": p.name,
                "policyDocument": version.document_text,
                "policyVersionId": id.to_string(),
                "isDefaultVersion": p.default_version == id,
                "creationDate": seconds(version.created_ms),
                "lastModifiedDate": seconds(p.modified_ms),
                "generationId": p.generation_id,
            }),
        ))
    })
}

fn list_policy_versions(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let p = state
            .security
            .get_policy(params.get("policyName"))
            .map_err(security_error)?;
        // Newest first.
        let versions: Vec<_> = p
            .versions
            .iter()
            .rev()
            .map(|(id, v)| {
                json!({
                    "versionId": id.to_string(),
                    "isDefaultVersion": *id == p.default_version,
                    "createDate": seconds(v.created_ms),
                })
            })
            .collect();
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "policyVersions": versions }),
        ))
    })
}

/// What SetDefaultPolicyVersion and DeletePolicyVersion do to the version in their path.
enum VersionChange {
    SetDefault,
    Delete,
}

/// SetDefaultPolicyVersion and DeletePolicyVersion: both answer `{}`.
async fn change_policy_version(
    state: Arc<IotState>,
    params: PathParams,
    change: VersionChange,
) -> OperationResult {
    let id = policy_version_id(&params)?;
    let name = params.get("policyName");
    match change {
        VersionChange::SetDefault => state.security.set_default_policy_version(name, id).await,
        VersionChange::Delete => state.security.delete_policy_version(name, id).await,
    }
    .map_err(security_error)?;
    empty_ok()
}

fn set_default_policy_version(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(change_policy_version(
        state,
        params,
        VersionChange::SetDefault,
    ))
}

fn delete_policy_version(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(change_policy_version(state, params, VersionChange::Delete))
}

fn render_policy_summary(p: &Policy) -> serde_json::Value {
    json!({ "policyName": p.name, "policyArn": p.arn })
}

fn list_policies(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let size = size_query(&request, "pageSize", 250, 250)?;
        let ascending = bool_query(&request, "isAscendingOrder")?.unwrap_or(true);
        let page = state
            .security
            .list_policies(size, request.query_param("marker").as_deref(), ascending)
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &page_body("policies", "nextMarker", page, render_policy_summary),
        ))
    })
}

fn delete_policy(
    state: Arc<IotState>,
    _request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        state
            .security
            .delete_policy(params.get("policyName"))
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct TargetRequest {
    #[serde(default)]
    target: String,
}

fn attach_policy(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: TargetRequest = parse_json_body(&request.body)?;
        state
            .security
            .attach_policy(params.get("policyName"), &body.target)
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn detach_policy(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let body: TargetRequest = parse_json_body(&request.body)?;
        state
            .security
            .detach_policy(params.get("policyName"), &body.target)
            .await
            .map_err(security_error)?;
        empty_ok()
    })
}

fn list_attached_policies(
    state: Arc<IotState>,
    request: AwsRequest,
    params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let size = size_query(&request, "pageSize", 250, 250)?;
        bool_query(&request, "recursive")?;
        let page = state
            .security
            .list_attached_policies(
                params.get("target"),
                size,
                request.query_param("marker").as_deref(),
            )
            .map_err(security_error)?;
        Ok(json_response(
            Protocol::RestJson1,
            &page_body("policies", "nextMarker", page, render_policy_summary),
        ))
    })
}

fn describe_endpoint(
    state: Arc<IotState>,
    request: AwsRequest,
    _params: PathParams,
) -> BoxFuture<'static, OperationResult> {
    Box::pin(async move {
        let kind = request.query_param("endpointType");
        let address = state
            .security_settings
            .endpoint_address(kind.as_deref())
            .ok_or_else(|| {
                AwsError::client(
                    "InvalidRequestException",
                    format!(
                        "Endpoint type {} is not valid; use iot:Data, iot:Data-ATS, iot:CredentialProvider or iot:Jobs",
                        kind.unwrap_or_default()
                    ),
                )
            })?;
        Ok(json_response(
            Protocol::RestJson1,
            &json!({ "endpointAddress": address }),
        ))
    })
}
