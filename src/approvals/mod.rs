//! The approvals use case: listing requests, showing one with the action it would release,
//! voting, and (in [`expiry`]) closing requests whose deadline passed. The HTTP handlers in
//! `api::approvals` parse, call these and map the answer; the SQL lives in
//! `store::policy`.
//!
//! Invariants:
//! - namespaces are tenants: a listing only ever reads the namespaces the token may see,
//!   and a request in a namespace the token may not see answers like a missing one;
//! - reading and listing need `approver` in the namespace; a vote needs the role the
//!   holding rule names; the subject that submitted the event never votes on it;
//! - the first final decision wins, one vote per subject (kept by the store, atomically).

pub mod expiry;
pub mod view;

use chrono::Utc;
use serde::Serialize;

use crate::auth::{AuthError, Principal, Role};
use crate::catalog::Catalog;
use crate::ids::{DeliveryId, EventId};
use crate::store::policy::{ApprovalQuery, ApprovalRecord, VoteOutcome};
use crate::store::{Store, StoreError};
use view::{spend_of, ApprovalView, EndpointShown, EventShown, Progress};

/// Why an approvals call did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// Unknown, or in a namespace the caller may not see (the same answer, so nothing leaks).
    #[error("no approval request `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Forbidden(#[from] AuthError),
    /// The request was already decided or expired.
    #[error("approval request `{id}` is already {state}")]
    Closed { id: String, state: String },
    #[error("`{voter}` already voted on `{id}`")]
    AlreadyVoted { id: String, voter: String },
    #[error("the approvals store failed")]
    Store(
        #[from]
        #[source]
        StoreError,
    ),
}

/// States a request can be listed by.
pub const STATES: [&str; 4] = ["pending", "granted", "denied", "expired"];

/// Requests newest first: of `namespace` (the caller needs `approver` there), or without
/// one, of every namespace the caller may see.
pub async fn list(
    store: &Store,
    principal: &Principal,
    namespace: Option<&str>,
    state: Option<&str>,
    limit: u32,
) -> Result<Vec<ApprovalRecord>, ApprovalError> {
    let namespaces = match namespace {
        Some(namespace) => {
            principal.authorize(Role::Approver, namespace)?;
            Some(vec![namespace.to_owned()])
        }
        None => {
            principal.require_role(Role::Approver)?;
            principal.namespace_scope().map(<[String]>::to_vec)
        }
    };
    let query = ApprovalQuery { namespaces, state: state.map(str::to_owned), limit };
    Ok(store.list_approvals(&query).await?)
}

/// Loads a request the caller may see, with its votes.
async fn find(
    store: &Store,
    principal: &Principal,
    id: &str,
) -> Result<(ApprovalRecord, Vec<crate::store::policy::VoteRecord>), ApprovalError> {
    let not_found = || ApprovalError::NotFound(id.to_owned());
    let (approval, votes) = store.get_approval(id).await?.ok_or_else(not_found)?;
    if !principal.may_access(&approval.namespace) {
        return Err(not_found());
    }
    Ok((approval, votes))
}

/// One request with everything needed to judge it: the event (an approver needs no
/// `viewer` to see it), the endpoint, the decision with its spend figures, the votes.
pub async fn show(
    store: &Store,
    catalog: &Catalog,
    principal: &Principal,
    id: &str,
) -> Result<ApprovalView, ApprovalError> {
    let (request, votes) = find(store, principal, id).await?;
    principal.authorize(Role::Approver, &request.namespace)?;
    let corrupt = |what: &str, e: crate::ids::InvalidId| StoreError::Corrupt(format!("approval {id}: {what}: {e}"));
    let event_id = EventId::parse(&request.event_id).map_err(|e| corrupt("event id", e))?;
    let delivery_id = DeliveryId::parse(&request.delivery_id).map_err(|e| corrupt("delivery id", e))?;
    let event = store.get_event(&event_id).await?.map(|stored| EventShown::of(&stored));
    let decision = store.get_delivery(&delivery_id).await?.and_then(|(delivery, _)| delivery.decision);
    let endpoint_detail = catalog.endpoint(&request.namespace, &request.endpoint).map(|e| EndpointShown {
        name: e.name.clone(),
        url: e.spec.url.clone(),
        labels: e.labels.clone(),
        agent: e.spec.agent,
    });
    Ok(ApprovalView {
        progress: Progress::of(&votes, request.quorum),
        spend: decision.as_ref().map(spend_of).unwrap_or_default(),
        request,
        votes,
        event,
        endpoint_detail,
        decision,
    })
}

/// What a counted vote did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VoteResult {
    pub id: String,
    /// `pending` (more grants needed), `granted` or `denied`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grants: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
}

/// One vote by the caller. `reason` is trimmed and not blank (the caller checked). A grant
/// that decides the request wakes the delivery workers (`wake` in this process, and every
/// process on PostgreSQL).
pub async fn vote(
    store: &Store,
    wake: &tokio::sync::Notify,
    principal: &Principal,
    id: &str,
    grant: bool,
    reason: &str,
) -> Result<VoteResult, ApprovalError> {
    let (approval, _) = find(store, principal, id).await?;
    let role = match approval.role.as_str() {
        "admin" => Role::Admin,
        "operator" => Role::Operator,
        _ => Role::Approver,
    };
    principal.authorize(role, &approval.namespace)?;
    if principal.subject == approval.requested_by {
        return Err(AuthError::SelfApproval.into());
    }
    let outcome = store.vote_on_approval(id, &principal.subject, grant, reason, Utc::now()).await?;
    let verb = if grant { "grant" } else { "deny" };
    tracing::info!(approval_id = %id, voter = %principal.subject, vote = verb, outcome = ?outcome, "approval vote");
    match outcome {
        VoteOutcome::Counted { grants, quorum } => {
            Ok(VoteResult { id: id.to_owned(), state: "pending".into(), grants: Some(grants), quorum: Some(quorum) })
        }
        VoteOutcome::Decided(decided) => {
            let outcome = if grant { "granted" } else { "denied" };
            metrics::counter!("hookwarden_policy_approvals_total", "outcome" => outcome).increment(1);
            let waited = (Utc::now() - approval.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("hookwarden_policy_approval_seconds", "outcome" => outcome).record(waited);
            if grant {
                wake.notify_one();
                if let Err(e) = store.notify_work().await {
                    tracing::warn!(error = %e, "could not notify other processes; their workers poll");
                }
            }
            Ok(VoteResult { id: id.to_owned(), state: decided, grants: None, quorum: None })
        }
        VoteOutcome::Closed(state) => Err(ApprovalError::Closed { id: id.to_owned(), state }),
        VoteOutcome::AlreadyVoted => {
            Err(ApprovalError::AlreadyVoted { id: id.to_owned(), voter: principal.subject.clone() })
        }
        VoteOutcome::NotFound => Err(ApprovalError::NotFound(id.to_owned())),
    }
}
