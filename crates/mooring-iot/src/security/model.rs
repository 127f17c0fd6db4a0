//! The security registry: certificates, policies with their versions, policy attachments and
//! thing principals, with the rules AWS IoT applies to each operation.
//!
//! State is kept in memory (the broker's authorizer reads it on every connect, publish,
//! subscribe and delivery) and written through to a [`SecurityStore`] before an operation
//! answers. Things come from [`ThingRegistry`]: their existence is checked there, and a
//! copy of each thing's type and attributes is followed through its change feed for the
//! `iot:Connection.Thing.*` policy variables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use mooring_core::pki::CertificateAuthority;
use mooring_core::Arns;

use super::certificates::{
    self, facts_of_der, verify_for_registration, CertificateFacts, CertificateStatus,
};
use super::policy::{MalformedPolicy, PolicyDocument};
use super::store::{CertificateRow, PolicyRow, PolicyVersionRow, SecurityOp, SecurityStore};
use crate::registry::groups::{GroupChange, ThingGroupRegistry};
use crate::registry::things::{Thing, ThingChange, ThingFilter, ThingRegistry};

/// Policies one target may carry.
pub const MAX_POLICIES_PER_TARGET: usize = 10;

/// Why a security operation failed; the API maps each to AWS's exception.
#[derive(Debug, Clone, PartialEq)]
pub enum SecurityError {
    InvalidRequest(String),
    NotFound(String),
    AlreadyExists {
        message: String,
        id: String,
        arn: String,
    },
    MalformedPolicy(String),
    CertificateValidation(String),
    CertificateState(String),
    DeleteConflict(String),
    LimitExceeded(String),
    VersionsLimitExceeded(String),
    Internal(String),
}

pub type SecurityResult<T> = Result<T, SecurityError>;

impl From<mooring_core::store::StoreError> for SecurityError {
    fn from(e: mooring_core::store::StoreError) -> Self {
        SecurityError::Internal(e.to_string())
    }
}

impl From<MalformedPolicy> for SecurityError {
    fn from(e: MalformedPolicy) -> Self {
        SecurityError::MalformedPolicy(e.0)
    }
}

/// One registered certificate.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub id: String,
    pub arn: String,
    pub pem: String,
    pub ca_certificate_id: Option<String>,
    pub status: CertificateStatus,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub customer_version: i64,
    pub generation_id: String,
    pub facts: Arc<CertificateFacts>,
}

impl Certificate {
    fn row(&self) -> CertificateRow {
        CertificateRow {
            id: self.id.clone(),
            pem: self.pem.clone(),
            ca_certificate_id: self.ca_certificate_id.clone(),
            status: self.status.as_str().into(),
            created_ms: self.created_ms,
            modified_ms: self.modified_ms,
            customer_version: self.customer_version,
            generation_id: self.generation_id.clone(),
        }
    }
}

/// Most versions a policy keeps (CreatePolicyVersion beyond it: VersionsLimitExceeded).
pub const MAX_POLICY_VERSIONS: usize = 5;

/// One policy: its versions (CreatePolicy makes version "1"; ids are never reused), of which
/// the default one ([`Policy::default_version`]) is what authorization evaluates.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub arn: String,
    pub created_ms: i64,
    pub modified_ms: i64,
    pub generation_id: String,
    /// The default version's id (always one of `versions`).
    pub default_version: u32,
    /// The highest version id handed out.
    pub last_version: u32,
    pub versions: BTreeMap<u32, PolicyVersion>,
}

/// One version of a policy.
#[derive(Debug, Clone)]
pub struct PolicyVersion {
    pub document_text: String,
    pub document: Arc<PolicyDocument>,
    pub created_ms: i64,
}

impl Policy {
    /// The default version, the one authorization evaluates.
    pub fn in_force(&self) -> &PolicyVersion {
        &self.versions[&self.default_version]
    }

    fn row(&self) -> PolicyRow {
        PolicyRow {
            name: self.name.clone(),
            document: self.in_force().document_text.clone(),
            created_ms: self.created_ms,
            modified_ms: self.modified_ms,
            generation_id: self.generation_id.clone(),
            default_version: self.default_version as i64,
            last_version: self.last_version as i64,
            versions: self
                .versions
                .iter()
                .map(|(id, v)| PolicyVersionRow {
                    id: *id as i64,
                    document: v.document_text.clone(),
                    created_ms: v.created_ms,
                })
                .collect(),
        }
    }

    fn version(&self, id: u32) -> SecurityResult<&PolicyVersion> {
        self.versions.get(&id).ok_or_else(|| {
            SecurityError::NotFound(format!(
                "Policy version not found (name={}, version={id})",
                self.name
            ))
        })
    }
}

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

#[derive(Default)]
struct State {
    certificates: BTreeMap<String, Certificate>,
    policies: BTreeMap<String, Policy>,
    /// target -> policy names
    targets: BTreeMap<String, BTreeSet<String>>,
    /// thing -> principal -> principal type
    thing_principals: BTreeMap<String, BTreeMap<String, String>>,
    /// A copy of the things registry (type and attributes) for policy variables.
    things: HashMap<String, Thing>,
    /// A copy of the thing groups registry: each thing's groups, and each known group's
    /// parent (for the policies attached to a thing's groups and their ancestors).
    thing_groups: HashMap<String, BTreeSet<String>>,
    group_parents: HashMap<String, Option<String>>,
}

/// How deep thing groups nest at most (AWS allows 7 levels).
const MAX_GROUP_DEPTH: usize = 7;

/// Called with a certificate id when it stops being ACTIVE.
type RevokedHook = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    store: Arc<dyn SecurityStore>,
    arns: Arns,
    ca: Arc<CertificateAuthority>,
    things: ThingRegistry,
    state: RwLock<State>,
    /// Bumped on every change that can alter an authorization decision.
    generation: AtomicU64,
    /// Called with a certificate id when it stops being ACTIVE or is deleted.
    on_revoked: OnceLock<RevokedHook>,
    /// Held by each change to an existing policy's versions and by DeletePolicy (see
    /// `update_policy`).
    policy_updates: tokio::sync::Mutex<()>,
}

/// The security registry; cheap to clone.
#[derive(Clone)]
pub struct Security {
    inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn generation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Checks a policy name: `[\w+=,.@-]+`, 1 to 128 characters.
pub fn validate_policy_name(name: &str) -> SecurityResult<()> {
    let ok = (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SecurityError::InvalidRequest(format!(
            "1 validation error detected: Value '{name}' at 'policyName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]+"
        )))
    }
}

/// Checks a certificate id: 64 hex characters.
pub fn validate_certificate_id(id: &str) -> SecurityResult<()> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(SecurityError::InvalidRequest(format!(
            "1 validation error detected: Value '{id}' at 'certificateId' failed to satisfy constraint: Member must satisfy regular expression pattern: (0x)?[a-fA-F0-9]+ and have length 64"
        )))
    }
}

impl Security {
    /// Loads the stored state. Things are followed from `things` in the background.
    pub fn open(
        store: Arc<dyn SecurityStore>,
        arns: Arns,
        ca: Arc<CertificateAuthority>,
        things: ThingRegistry,
    ) -> anyhow::Result<Security> {
        let loaded = store.load()?;
        let security = Security {
            inner: Arc::new(Inner {
                store,
                arns,
                ca,
                things,
                state: RwLock::new(State::default()),
                generation: AtomicU64::new(1),
                on_revoked: OnceLock::new(),
                policy_updates: tokio::sync::Mutex::new(()),
            }),
        };
        {
            let mut state = security.write();
            for row in loaded.certificates {
                match security.certificate_from_row(row) {
                    Ok(c) => {
                        state.certificates.insert(c.id.clone(), c);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable stored certificate")
                    }
                }
            }
            for row in loaded.policies {
                let name = row.name.clone();
                match security.policy_from_row(row) {
                    Ok(policy) => {
                        state.policies.insert(name, policy);
                    }
                    Err(e) => {
                        tracing::warn!(policy = %name, error = ?e, "skipping a stored policy")
                    }
                }
            }
            for (policy, target) in loaded.policy_targets {
                state.targets.entry(target).or_default().insert(policy);
            }
            for (thing, principal, kind) in loaded.thing_principals {
                state
                    .thing_principals
                    .entry(thing)
                    .or_default()
                    .insert(principal, kind);
            }
        }
        Ok(security)
    }

    /// Follows the things registry (for policy variables and to drop the principals of
    /// deleted things). Needs a Tokio runtime.
    pub fn follow_things(&self) {
        let this = self.clone();
        let mut changes = self.inner.things.subscribe();
        tokio::spawn(async move {
            if let Ok(page) = this
                .inner
                .things
                .list(ThingFilter::default(), usize::MAX, None)
                .await
            {
                let mut state = this.write();
                for thing in page.things {
                    state.things.insert(thing.name.clone(), thing);
                }
            }
            this.bump();
            loop {
                match changes.recv().await {
                    Ok(ThingChange::Created(t)) | Ok(ThingChange::Updated(t)) => {
                        this.write().things.insert(t.name.clone(), t);
                    }
                    Ok(ThingChange::Deleted(t)) => {
                        let had_principals = {
                            let mut state = this.write();
                            state.things.remove(&t.name);
                            state.thing_principals.remove(&t.name).is_some()
                        };
                        if had_principals {
                            let store = this.inner.store.clone();
                            let name = t.name.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                store.apply(&[SecurityOp::DetachAllFromThing(name)])
                            })
                            .await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
                this.bump();
            }
        });
    }

    /// Follows the thing groups registry, so that policies attached to a thing group (or to
    /// one of its ancestors) apply to the connections of its things. Needs a Tokio runtime.
    pub fn follow_groups(&self, groups: ThingGroupRegistry) {
        let this = self.clone();
        let mut changes = groups.subscribe();
        tokio::spawn(async move {
            this.reload_groups(&groups).await;
            loop {
                match changes.recv().await {
                    Ok(GroupChange::ThingAdded { group, thing }) => {
                        // Root first, down to the group's parent.
                        let chain = groups.ancestors(&group).await.unwrap_or_default();
                        let mut state = this.write();
                        let parent = chain.last().map(|g| g.name.clone());
                        state.group_parents.insert(group.clone(), parent);
                        for g in chain {
                            state.group_parents.insert(g.name, g.parent);
                        }
                        state.thing_groups.entry(thing).or_default().insert(group);
                    }
                    Ok(GroupChange::ThingRemoved { group, thing }) => {
                        let mut state = this.write();
                        if let Some(set) = state.thing_groups.get_mut(&thing) {
                            set.remove(&group);
                        }
                    }
                    Ok(GroupChange::GroupDeleted { group }) => {
                        let mut state = this.write();
                        state.group_parents.remove(&group);
                        for set in state.thing_groups.values_mut() {
                            set.remove(&group);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        this.reload_groups(&groups).await;
                    }
                    Err(_) => return,
                }
                this.bump();
            }
        });
    }

    /// Reads every group and membership afresh.
    async fn reload_groups(&self, groups: &ThingGroupRegistry) {
        let Ok(all) = groups.list(None, None, false).await else {
            return;
        };
        let mut thing_groups: HashMap<String, BTreeSet<String>> = HashMap::new();
        for g in &all {
            for thing in groups.direct_members(&g.name).await.unwrap_or_default() {
                thing_groups
                    .entry(thing)
                    .or_default()
                    .insert(g.name.clone());
            }
        }
        {
            let mut state = self.write();
            state.group_parents = all.into_iter().map(|g| (g.name, g.parent)).collect();
            state.thing_groups = thing_groups;
        }
        self.bump();
    }

    /// The documents of the policies attached to `thing`'s groups and their ancestors.
    pub fn thing_group_documents(&self, thing: &str) -> Vec<Arc<PolicyDocument>> {
        let groups: BTreeSet<String> = {
            let state = self.read();
            let mut found = BTreeSet::new();
            for direct in state.thing_groups.get(thing).into_iter().flatten() {
                let mut current = Some(direct.clone());
                for _ in 0..=MAX_GROUP_DEPTH {
                    let Some(group) = current else { break };
                    current = state.group_parents.get(&group).cloned().flatten();
                    if !found.insert(group) {
                        break;
                    }
                }
            }
            found
        };
        groups
            .iter()
            .flat_map(|g| {
                self.documents_for(&self.inner.arns.arn("iot", &format!("thinggroup/{g}")))
            })
            .collect()
    }

    /// Registers what to do when a certificate stops being ACTIVE (disconnect its clients).
    pub fn on_certificate_revoked(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.inner.on_revoked.set(Box::new(f));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.inner.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever something that affects authorization changes.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    pub fn arns(&self) -> &Arns {
        &self.inner.arns
    }

    pub fn certificate_arn(&self, id: &str) -> String {
        self.inner.arns.arn("iot", &format!("cert/{id}"))
    }

    pub fn policy_arn(&self, name: &str) -> String {
        self.inner.arns.arn("iot", &format!("policy/{name}"))
    }

    fn certificate_from_row(&self, row: CertificateRow) -> Result<Certificate, String> {
        let der = mooring_core::pki::pem_to_der(&row.pem).map_err(|e| e.to_string())?;
        let facts = facts_of_der(&der)?;
        Ok(Certificate {
            arn: self.certificate_arn(&row.id),
            status: CertificateStatus::parse(&row.status).unwrap_or(CertificateStatus::Inactive),
            id: row.id,
            pem: row.pem,
            ca_certificate_id: row.ca_certificate_id,
            created_ms: row.created_ms,
            modified_ms: row.modified_ms,
            customer_version: row.customer_version,
            generation_id: row.generation_id,
            facts: Arc::new(facts),
        })
    }

    async fn persist(&self, ops: Vec<SecurityOp>) -> SecurityResult<()> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.apply(&ops))
            .await
            .map_err(|e| SecurityError::Internal(e.to_string()))??;
        Ok(())
    }

    // ---- certificates ------------------------------------------------------------------

    /// CreateKeysAndCertificate: a new RSA key pair and a certificate from Mooring's CA.
    pub async fn create_keys_and_certificate(
        &self,
        set_as_active: bool,
    ) -> SecurityResult<(Certificate, certificates::IssuedKeys)> {
        let ca = self.inner.ca.clone();
        let keys =
            tokio::task::spawn_blocking(move || certificates::issue_keys_and_certificate(&ca))
                .await
                .map_err(|e| SecurityError::Internal(e.to_string()))?
                .map_err(SecurityError::Internal)?;
        let status = if set_as_active {
            CertificateStatus::Active
        } else {
            CertificateStatus::Inactive
        };
        let certificate = self
            .insert_certificate(&keys.certificate_pem, None, status)
            .await?;
        Ok((certificate, keys))
    }

    /// RegisterCertificate.
    pub async fn register_certificate(
        &self,
        certificate_pem: &str,
        ca_certificate_pem: Option<&str>,
        status: CertificateStatus,
    ) -> SecurityResult<Certificate> {
        if matches!(
            status,
            CertificateStatus::PendingTransfer | CertificateStatus::PendingActivation
        ) {
            return Err(SecurityError::CertificateState(format!(
                "A certificate cannot be registered with status {}",
                status.as_str()
            )));
        }
        let der = verify_for_registration(
            certificate_pem,
            ca_certificate_pem,
            self.inner.ca.certificate_pem(),
        )
        .map_err(|e| SecurityError::CertificateValidation(e.0))?;
        let ca_id = match ca_certificate_pem {
            Some(ca) => Some(
                mooring_core::pki::certificate_id(ca)
                    .map_err(|e| SecurityError::CertificateValidation(e.to_string()))?,
            ),
            None => mooring_core::pki::certificate_id(self.inner.ca.certificate_pem()).ok(),
        };
        let id = certificates::certificate_id_of_der(&der);
        if let Some(existing) = self.read().certificates.get(&id) {
            return Err(SecurityError::AlreadyExists {
                message: "The certificate is already provisioned or registered".into(),
                id: existing.id.clone(),
                arn: existing.arn.clone(),
            });
        }
        self.insert_certificate(certificate_pem, ca_id, status)
            .await
    }

    async fn insert_certificate(
        &self,
        pem: &str,
        ca_certificate_id: Option<String>,
        status: CertificateStatus,
    ) -> SecurityResult<Certificate> {
        let der = mooring_core::pki::pem_to_der(pem)
            .map_err(|e| SecurityError::CertificateValidation(e.to_string()))?;
        let facts = facts_of_der(&der).map_err(SecurityError::CertificateValidation)?;
        let id = certificates::certificate_id_of_der(&der);
        let ca_certificate_id = ca_certificate_id
            .or_else(|| mooring_core::pki::certificate_id(self.inner.ca.certificate_pem()).ok());
        let now = now_ms();
        let certificate = Certificate {
            arn: self.certificate_arn(&id),
            id,
            pem: pem.to_string(),
            ca_certificate_id,
            status,
            created_ms: now,
            modified_ms: now,
            customer_version: 1,
            generation_id: generation_id(),
            facts: Arc::new(facts),
        };
        self.persist(vec![SecurityOp::PutCertificate(certificate.row())])
            .await?;
        self.write()
            .certificates
            .insert(certificate.id.clone(), certificate.clone());
        self.bump();
        Ok(certificate)
    }

    /// The certificate `id`, if registered.
    pub fn certificate(&self, id: &str) -> Option<Certificate> {
        self.read().certificates.get(id).cloned()
    }

    /// DescribeCertificate.
    pub fn describe_certificate(&self, id: &str) -> SecurityResult<Certificate> {
        validate_certificate_id(id)?;
        self.certificate(id)
            .ok_or_else(|| SecurityError::NotFound(format!("The certificate {id} does not exist")))
    }

    /// UpdateCertificate. A certificate leaving ACTIVE has its live connections closed.
    pub async fn update_certificate(&self, id: &str, new_status: &str) -> SecurityResult<()> {
        let status = CertificateStatus::parse(new_status).ok_or_else(|| {
            SecurityError::InvalidRequest(format!(
                "1 validation error detected: Value '{new_status}' at 'newStatus' failed to satisfy constraint: Member must satisfy enum value set: [ACTIVE, INACTIVE, REVOKED, PENDING_TRANSFER, REGISTER_INACTIVE, PENDING_ACTIVATION]"
            ))
        })?;
        let mut certificate = self.describe_certificate(id)?;
        if matches!(
            status,
            CertificateStatus::PendingTransfer
                | CertificateStatus::RegisterInactive
                | CertificateStatus::PendingActivation
        ) {
            return Err(SecurityError::InvalidRequest(format!(
                "The status of a certificate cannot be set to {new_status}"
            )));
        }
        if certificate.status == CertificateStatus::Revoked && status != CertificateStatus::Revoked
        {
            return Err(SecurityError::CertificateState(
                "Certificate is revoked and cannot be reactivated".into(),
            ));
        }
        if certificate.status == CertificateStatus::PendingTransfer {
            return Err(SecurityError::CertificateState(
                "Certificate is pending transfer".into(),
            ));
        }
        certificate.status = status;
        certificate.modified_ms = now_ms();
        certificate.customer_version += 1;
        certificate.generation_id = generation_id();
        self.persist(vec![SecurityOp::PutCertificate(certificate.row())])
            .await?;
        self.write()
            .certificates
            .insert(certificate.id.clone(), certificate);
        self.bump();
        if status != CertificateStatus::Active {
            self.revoked(id);
        }
        Ok(())
    }

    fn revoked(&self, id: &str) {
        if let Some(f) = self.inner.on_revoked.get() {
            f(id);
        }
    }

    /// DeleteCertificate: not while ACTIVE (406), not while attached to a thing, nor to a
    /// policy unless `force` (409).
    pub async fn delete_certificate(&self, id: &str, force: bool) -> SecurityResult<()> {
        let certificate = self.describe_certificate(id)?;
        if certificate.status == CertificateStatus::Active {
            return Err(SecurityError::CertificateState(
                "Certificate must be deactivated (not ACTIVE) before deletion.".into(),
            ));
        }
        let (policies, things) = {
            let state = self.read();
            let policies: Vec<String> = state
                .targets
                .get(&certificate.arn)
                .map(|p| p.iter().cloned().collect())
                .unwrap_or_default();
            let things: Vec<String> = state
                .thing_principals
                .iter()
                .filter(|(_, principals)| principals.contains_key(&certificate.arn))
                .map(|(t, _)| t.clone())
                .collect();
            (policies, things)
        };
        if !things.is_empty() {
            return Err(SecurityError::DeleteConflict(format!(
                "Things must be detached before deletion (arn: {})",
                certificate.arn
            )));
        }
        if !policies.is_empty() && !force {
            return Err(SecurityError::DeleteConflict(format!(
                "Certificate policies must be detached before deletion (arn: {})",
                certificate.arn
            )));
        }
        let mut ops: Vec<SecurityOp> = policies
            .iter()
            .map(|p| SecurityOp::Detach {
                policy: p.clone(),
                target: certificate.arn.clone(),
            })
            .collect();
        ops.push(SecurityOp::DeleteCertificate(id.to_string()));
        self.persist(ops).await?;
        {
            let mut state = self.write();
            state.certificates.remove(id);
            state.targets.remove(&certificate.arn);
        }
        self.bump();
        self.revoked(id);
        Ok(())
    }

    /// ListCertificates, in creation order.
    pub fn list_certificates(
        &self,
        page_size: usize,
        marker: Option<&str>,
        ascending: bool,
    ) -> SecurityResult<Page<Certificate>> {
        let mut all: Vec<Certificate> = self.read().certificates.values().cloned().collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        if !ascending {
            all.reverse();
        }
        paginate(all, page_size, marker)
    }

    // ---- policies ----------------------------------------------------------------------

    fn policy_from_row(&self, mut row: PolicyRow) -> SecurityResult<Policy> {
        if row.versions.is_empty() {
            // Written before policies had versions: the document is version 1.
            row.versions.push(PolicyVersionRow {
                id: 1,
                document: row.document.clone(),
                created_ms: row.created_ms,
            });
        }
        let mut versions = BTreeMap::new();
        for v in row.versions {
            let document = Arc::new(PolicyDocument::parse(&v.document)?);
            versions.insert(
                v.id as u32,
                PolicyVersion {
                    document_text: v.document,
                    document,
                    created_ms: v.created_ms,
                },
            );
        }
        let default_version = row.default_version as u32;
        if !versions.contains_key(&default_version) {
            return Err(SecurityError::Internal(format!(
                "default version {default_version} missing"
            )));
        }
        Ok(Policy {
            arn: self.policy_arn(&row.name),
            name: row.name,
            created_ms: row.created_ms,
            modified_ms: row.modified_ms,
            generation_id: row.generation_id,
            default_version,
            last_version: (row.last_version as u32).max(*versions.keys().last().unwrap_or(&1)),
            versions,
        })
    }

    /// CreatePolicy.
    pub async fn create_policy(&self, name: &str, document: &str) -> SecurityResult<Policy> {
        validate_policy_name(name)?;
        let parsed = PolicyDocument::parse(document)?;
        if let Some(existing) = self.read().policies.get(name) {
            return Err(SecurityError::AlreadyExists {
                message: format!("Policy cannot be created - name already exists (name={name})"),
                id: existing.name.clone(),
                arn: existing.arn.clone(),
            });
        }
        let now = now_ms();
        let policy = Policy {
            name: name.to_string(),
            arn: self.policy_arn(name),
            created_ms: now,
            modified_ms: now,
            generation_id: generation_id(),
            default_version: 1,
            last_version: 1,
            versions: BTreeMap::from([(
                1,
                PolicyVersion {
                    document_text: document.to_string(),
                    document: Arc::new(parsed),
                    created_ms: now,
                },
            )]),
        };
        self.persist(vec![SecurityOp::PutPolicy(policy.row())])
            .await?;
        self.write()
            .policies
            .insert(name.to_string(), policy.clone());
        self.bump();
        Ok(policy)
    }

    /// GetPolicy.
    pub fn get_policy(&self, name: &str) -> SecurityResult<Policy> {
        self.read()
            .policies
            .get(name)
            .cloned()
            .ok_or_else(|| SecurityError::NotFound(format!("Policy not found (name={name})")))
    }

    /// ListPolicies, in name order.
    pub fn list_policies(
        &self,
        page_size: usize,
        marker: Option<&str>,
        ascending: bool,
    ) -> SecurityResult<Page<Policy>> {
        let mut all: Vec<Policy> = self.read().policies.values().cloned().collect();
        if !ascending {
            all.reverse();
        }
        paginate(all, page_size, marker)
    }

    /// DeletePolicy: not while attached (409).
    pub async fn delete_policy(&self, name: &str) -> SecurityResult<()> {
        // Not while a version is being added or removed (see `update_policy`).
        let _serialized = self.inner.policy_updates.lock().await;
        let policy = self.get_policy(name)?;
        let attached = self
            .read()
            .targets
            .values()
            .any(|policies| policies.contains(name));
        if attached {
            return Err(SecurityError::DeleteConflict(format!(
                "The policy cannot be deleted as the policy is attached to one or more principals (name={name})"
            )));
        }
        if policy.versions.len() > 1 {
            return Err(SecurityError::DeleteConflict(format!(
                "Cannot delete a policy with non-default versions; delete them with DeletePolicyVersion first (name={name})"
            )));
        }
        self.persist(vec![SecurityOp::DeletePolicy(name.to_string())])
            .await?;
        self.write().policies.remove(name);
        self.bump();
        Ok(())
    }

    /// Applies `change` to a copy of policy `name`, persists the copy and puts it in place.
    /// Such changes run one at a time, so concurrent ones to the same policy cannot lose
    /// each other's versions.
    async fn update_policy<T>(
        &self,
        name: &str,
        change: impl FnOnce(&mut Policy) -> SecurityResult<T>,
    ) -> SecurityResult<T> {
        let _serialized = self.inner.policy_updates.lock().await;
        let mut policy = self.get_policy(name)?;
        let out = change(&mut policy)?;
        policy.modified_ms = now_ms();
        policy.generation_id = generation_id();
        self.persist(vec![SecurityOp::PutPolicy(policy.row())])
            .await?;
        self.write().policies.insert(name.to_string(), policy);
        self.bump();
        Ok(out)
    }

    /// CreatePolicyVersion: the new version's id, and the policy after it.
    pub async fn create_policy_version(
        &self,
        name: &str,
        document: &str,
        set_as_default: bool,
    ) -> SecurityResult<(u32, Policy)> {
        let parsed = Arc::new(PolicyDocument::parse(document)?);
        self.update_policy(name, |policy| {
            if policy.versions.len() >= MAX_POLICY_VERSIONS {
                return Err(SecurityError::VersionsLimitExceeded(format!(
                    "The policy {name} already has the maximum number of versions ({MAX_POLICY_VERSIONS})"
                )));
            }
            let id = policy.last_version + 1;
            policy.last_version = id;
            policy.versions.insert(
                id,
                PolicyVersion {
                    document_text: document.to_string(),
                    document: parsed.clone(),
                    created_ms: now_ms(),
                },
            );
            if set_as_default {
                policy.default_version = id;
            }
            Ok((id, policy.clone()))
        })
        .await
    }

    /// GetPolicyVersion.
    pub fn get_policy_version(
        &self,
        name: &str,
        id: u32,
    ) -> SecurityResult<(Policy, PolicyVersion)> {
        let policy = self.get_policy(name)?;
        let version = policy.version(id)?.clone();
        Ok((policy, version))
    }

    /// SetDefaultPolicyVersion: takes effect on the next authorization of every client the
    /// policy is attached to.
    pub async fn set_default_policy_version(&self, name: &str, id: u32) -> SecurityResult<()> {
        self.update_policy(name, |policy| {
            policy.version(id)?;
            policy.default_version = id;
            Ok(())
        })
        .await
    }

    /// DeletePolicyVersion: not the default one (409).
    pub async fn delete_policy_version(&self, name: &str, id: u32) -> SecurityResult<()> {
        self.update_policy(name, |policy| {
            policy.version(id)?;
            if id == policy.default_version {
                return Err(SecurityError::DeleteConflict(format!(
                    "Cannot delete the default version of a policy (name={name}, version={id})"
                )));
            }
            policy.versions.remove(&id);
            Ok(())
        })
        .await
    }

    fn check_target(&self, target: &str) -> SecurityResult<()> {
        if target.is_empty() {
            return Err(SecurityError::InvalidRequest(
                "1 validation error detected: Value null at 'target' failed to satisfy constraint: Member must not be null".into(),
            ));
        }
        if let Some(id) = certificate_id_of_arn(target) {
            if self.certificate(id).is_none() {
                return Err(SecurityError::NotFound(format!(
                    "The certificate {id} does not exist"
                )));
            }
        }
        Ok(())
    }

    /// AttachPolicy.
    pub async fn attach_policy(&self, name: &str, target: &str) -> SecurityResult<()> {
        self.get_policy(name)?;
        self.check_target(target)?;
        {
            let state = self.read();
            let current = state.targets.get(target);
            if current.is_some_and(|p| p.contains(name)) {
                return Ok(());
            }
            if current.is_some_and(|p| p.len() >= MAX_POLICIES_PER_TARGET) {
                return Err(SecurityError::LimitExceeded(format!(
                    "A target may have at most {MAX_POLICIES_PER_TARGET} policies attached"
                )));
            }
        }
        self.persist(vec![SecurityOp::Attach {
            policy: name.to_string(),
            target: target.to_string(),
        }])
        .await?;
        self.write()
            .targets
            .entry(target.to_string())
            .or_default()
            .insert(name.to_string());
        self.bump();
        Ok(())
    }

    /// DetachPolicy.
    pub async fn detach_policy(&self, name: &str, target: &str) -> SecurityResult<()> {
        if target.is_empty() {
            return self.check_target(target);
        }
        self.persist(vec![SecurityOp::Detach {
            policy: name.to_string(),
            target: target.to_string(),
        }])
        .await?;
        let mut state = self.write();
        if let Some(policies) = state.targets.get_mut(target) {
            policies.remove(name);
            if policies.is_empty() {
                state.targets.remove(target);
            }
        }
        drop(state);
        self.bump();
        Ok(())
    }

    /// ListAttachedPolicies.
    pub fn list_attached_policies(
        &self,
        target: &str,
        page_size: usize,
        marker: Option<&str>,
    ) -> SecurityResult<Page<Policy>> {
        self.check_target(target)?;
        let state = self.read();
        let policies: Vec<Policy> = state
            .targets
            .get(target)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| state.policies.get(n).cloned())
                    .collect()
            })
            .unwrap_or_default();
        drop(state);
        paginate(policies, page_size, marker)
    }

    /// The documents of the policies attached to `target`.
    pub fn documents_for(&self, target: &str) -> Vec<Arc<PolicyDocument>> {
        let state = self.read();
        state
            .targets
            .get(target)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| state.policies.get(n).map(|p| p.in_force().document.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    // ---- thing principals ----------------------------------------------------------------

    async fn require_thing(&self, thing: &str) -> SecurityResult<()> {
        self.inner
            .things
            .describe(thing)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                crate::registry::things::RegistryError::NotFound(m) => SecurityError::NotFound(m),
                other => SecurityError::Internal(other.to_string()),
            })
    }

    fn check_principal(&self, principal: &str) -> SecurityResult<()> {
        if principal.is_empty() {
            return Err(SecurityError::InvalidRequest(
                "1 validation error detected: Value null at 'principal' failed to satisfy constraint: Member must not be null".into(),
            ));
        }
        if let Some(id) = certificate_id_of_arn(principal) {
            if self.certificate(id).is_none() {
                return Err(SecurityError::NotFound(format!(
                    "The certificate {id} does not exist"
                )));
            }
        }
        Ok(())
    }

    /// AttachThingPrincipal.
    pub async fn attach_thing_principal(
        &self,
        thing: &str,
        principal: &str,
        kind: Option<&str>,
    ) -> SecurityResult<()> {
        let kind = kind.unwrap_or("NON_EXCLUSIVE_THING");
        if !matches!(kind, "EXCLUSIVE_THING" | "NON_EXCLUSIVE_THING") {
            return Err(SecurityError::InvalidRequest(format!(
                "1 validation error detected: Value '{kind}' at 'thingPrincipalType' failed to satisfy constraint: Member must satisfy enum value set: [EXCLUSIVE_THING, NON_EXCLUSIVE_THING]"
            )));
        }
        self.require_thing(thing).await?;
        self.check_principal(principal)?;
        {
            let state = self.read();
            let elsewhere: Vec<(&String, &String)> = state
                .thing_principals
                .iter()
                .filter(|(t, _)| t.as_str() != thing)
                .filter_map(|(t, principals)| principals.get(principal).map(|k| (t, k)))
                .collect();
            if kind == "EXCLUSIVE_THING" && !elsewhere.is_empty() {
                return Err(SecurityError::InvalidRequest(format!(
                    "Principal {principal} is already attached to thing {} and cannot be attached exclusively",
                    elsewhere[0].0
                )));
            }
            if let Some((t, _)) = elsewhere
                .iter()
                .find(|(_, k)| k.as_str() == "EXCLUSIVE_THING")
            {
                return Err(SecurityError::InvalidRequest(format!(
                    "Principal {principal} is exclusively attached to thing {t}"
                )));
            }
        }
        self.persist(vec![SecurityOp::AttachThing {
            thing: thing.to_string(),
            principal: principal.to_string(),
            kind: kind.to_string(),
        }])
        .await?;
        self.write()
            .thing_principals
            .entry(thing.to_string())
            .or_default()
            .insert(principal.to_string(), kind.to_string());
        self.bump();
        Ok(())
    }

    /// DetachThingPrincipal.
    pub async fn detach_thing_principal(&self, thing: &str, principal: &str) -> SecurityResult<()> {
        self.require_thing(thing).await?;
        if principal.is_empty() {
            return self.check_principal(principal);
        }
        self.persist(vec![SecurityOp::DetachThing {
            thing: thing.to_string(),
            principal: principal.to_string(),
        }])
        .await?;
        let mut state = self.write();
        if let Some(principals) = state.thing_principals.get_mut(thing) {
            principals.remove(principal);
            if principals.is_empty() {
                state.thing_principals.remove(thing);
            }
        }
        drop(state);
        self.bump();
        Ok(())
    }

    /// ListThingPrincipals.
    pub async fn list_thing_principals(
        &self,
        thing: &str,
        max_results: usize,
        next_token: Option<&str>,
    ) -> SecurityResult<Page<String>> {
        self.require_thing(thing).await?;
        let principals: Vec<String> = self
            .read()
            .thing_principals
            .get(thing)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        paginate(principals, max_results, next_token)
    }

    /// ListPrincipalThings.
    pub fn list_principal_things(
        &self,
        principal: &str,
        max_results: usize,
        next_token: Option<&str>,
    ) -> SecurityResult<Page<String>> {
        self.check_principal(principal)?;
        let things = self.things_of(principal);
        paginate(things, max_results, next_token)
    }

    /// The things `principal` is attached to, in name order.
    /// The thing `principal` is attached to with `EXCLUSIVE_THING`, if any.
    pub fn exclusive_thing_of(&self, principal: &str) -> Option<String> {
        self.read()
            .thing_principals
            .iter()
            .find(|(_, p)| p.get(principal).is_some_and(|k| k == "EXCLUSIVE_THING"))
            .map(|(t, _)| t.clone())
    }

    pub fn things_of(&self, principal: &str) -> Vec<String> {
        self.read()
            .thing_principals
            .iter()
            .filter(|(_, p)| p.contains_key(principal))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// A copy of thing `name` as last seen in the registry.
    pub fn thing(&self, name: &str) -> Option<Thing> {
        self.read().things.get(name).cloned()
    }
}

/// The certificate id in a certificate ARN (`arn:...:cert/<id>`).
pub fn certificate_id_of_arn(arn: &str) -> Option<&str> {
    Arns::parse(arn)?.resource.strip_prefix("cert/")
}

/// Splits `items` into a page after the offset in `marker`.
fn paginate<T>(items: Vec<T>, page_size: usize, marker: Option<&str>) -> SecurityResult<Page<T>> {
    let start = match marker {
        None | Some("") => 0,
        Some(m) => m.parse::<usize>().map_err(|_| {
            SecurityError::InvalidRequest(format!("The pagination marker '{m}' is not valid"))
        })?,
    };
    let total = items.len();
    let items: Vec<T> = items.into_iter().skip(start).take(page_size).collect();
    let end = start + items.len();
    Ok(Page {
        items,
        next: (end < total).then(|| end.to_string()),
    })
}
