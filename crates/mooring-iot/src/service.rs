//! The `iot` service behind the front door, and the start-up of everything in this crate.
//!
//! [`Iot::start`] opens the rule store, creates the rules declared in `[[iot.rules]]`,
//! starts the rules engine with every stored rule and builds the [`IotService`] that answers
//! the `iot` restJson1 API (signing name `iot`).

use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Body;
use axum::http::Response;
use futures::future::BoxFuture;
use mooring_aws::{AwsRequest, AwsService, OperationName, Protocol, Route};
use mooring_core::ServiceContext;

use crate::api::{self, IotState, Router};
use crate::config::IotConfig;
use crate::engine::RulesEngine;
use crate::external::MooringFunctions;
use crate::jobs::data_api::JobsDataService;
use crate::jobs::Jobs;
use crate::model::TopicRules;
use crate::registry::groups::ThingGroupRegistry;
use crate::registry::things::ThingRegistry;
use crate::shadow::api::ShadowDataService;
use crate::shadow::Shadows;
use crate::store::SqliteRuleStore;

/// The `iot` control-plane API.
pub struct IotService {
    router: Router,
    state: Arc<IotState>,
}

impl AwsService for IotService {
    fn name(&self) -> &'static str {
        "iot"
    }

    fn signing_names(&self) -> &'static [&'static str] {
        &["iot"]
    }

    fn protocol(&self) -> Protocol {
        Protocol::RestJson1
    }

    fn matches(&self, route: &Route<'_>) -> bool {
        if route.target.is_some() {
            return false;
        }
        if let Some(name) = route.signing_name {
            if name != "iot" {
                return false;
            }
        }
        self.router.find(route.method, route.path).is_some()
    }

    fn call(&self, request: AwsRequest) -> BoxFuture<'static, Response<Body>> {
        let found = self
            .router
            .find(request.request.method(), request.request.uri().path())
            .map(|(route, params)| (route.handler, route.operation, params));
        let state = self.state.clone();
        Box::pin(async move {
            let Some((handler, operation, params)) = found else {
                let what = format!(
                    "{} {}",
                    request.request.method(),
                    request.request.uri().path()
                );
                return mooring_aws::AwsError::unknown_operation(&what)
                    .into_response(Protocol::RestJson1);
            };
            let mut response = match handler(state, request, params).await {
                Ok(response) => response,
                Err(e) => e.into_response(Protocol::RestJson1),
            };
            response
                .extensions_mut()
                .insert(OperationName(operation.to_string()));
            response
        })
    }
}

/// Everything this crate runs: the API service, the rules engine and the rule operations.
pub struct Iot {
    pub service: Arc<IotService>,
    pub engine: Arc<RulesEngine>,
    pub rules: TopicRules,
    pub things: ThingRegistry,
    pub security: crate::security::SecurityPlane,
    pub groups: ThingGroupRegistry,
    /// IoT Jobs; attach the broker with [`Jobs::attach_broker`].
    pub jobs: Arc<Jobs>,
    /// The `iot-jobs-data` HTTP device API.
    pub jobs_data: Arc<JobsDataService>,
    /// Device shadows; attach the broker with [`Shadows::attach_broker`].
    pub shadows: Arc<Shadows>,
    /// The shadow operations of `iot-data`.
    pub shadow_data: Arc<ShadowDataService>,
}

impl Iot {
    /// Opens the store, applies `[[iot.rules]]`, loads the engine. Needs a Tokio runtime.
    pub fn start(ctx: &ServiceContext) -> anyhow::Result<Iot> {
        let config: IotConfig = ctx.config.section("iot")?;
        let store = Arc::new(
            SqliteRuleStore::open(ctx.db.clone()).context("opening the topic rule store")?,
        );
        let engine = RulesEngine::start(ctx, &config);
        let rules = TopicRules::new(store, engine.clone(), ctx.arns.clone(), ctx.clock.clone());
        for declared in &config.rules {
            rules
                .upsert_declared_blocking(&declared.name, declared.payload())
                .map_err(|e| anyhow::anyhow!("[[iot.rules]] {}: {e}", declared.name))?;
        }
        let loaded = rules
            .load_into_engine_blocking()
            .map_err(|e| anyhow::anyhow!("loading topic rules: {e}"))?;
        tracing::info!(rules = loaded, "rules engine started");
        let things = ThingRegistry::open(ctx.db.clone(), ctx.arns.clone())
            .context("opening the thing registry")?;
        let security =
            crate::security::SecurityPlane::start(ctx, config.security.clone(), things.clone())
                .context("opening the security registry")?;
        let groups = ThingGroupRegistry::open(ctx.db.clone(), ctx.arns.clone(), things.clone())
            .context("opening the thing group registry")?;
        security.registry.follow_groups(groups.clone());
        let jobs = Jobs::open(ctx, things.clone(), groups.clone(), config.jobs.clone())
            .context("opening the jobs store")?;
        jobs.run(&ctx.shutdown);
        let state = Arc::new(IotState {
            rules: rules.clone(),
            things: things.clone(),
            security: security.registry.clone(),
            security_settings: security.settings.clone(),
            groups: groups.clone(),
            jobs: jobs.clone(),
        });
        let jobs_data = Arc::new(JobsDataService::new(state.clone()));
        let shadows = Shadows::open(ctx).context("opening the shadow store")?;
        let shadow_data = ShadowDataService::new(shadows.clone());
        engine.set_external_functions(Arc::new(MooringFunctions::new(
            things.clone(),
            shadows.clone(),
            config.functions.clone(),
        )));
        engine.replay_pending();
        let service = Arc::new(IotService {
            router: api::routes(),
            state,
        });
        Ok(Iot {
            service,
            engine,
            rules,
            things,
            security,
            groups,
            jobs,
            jobs_data,
            shadows,
            shadow_data,
        })
    }
}
