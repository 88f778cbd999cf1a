//! Steps 6 to 8, once the rules have decided: admission (the duplicate guard, then rate
//! limits, token budgets and the spend reservation, then, if an `approve` rule holds the
//! request, the approval desk), fetched credentials, and the record in the metrics and
//! the audit. Apart from steps 1 to 5 (`pipeline`) because the shared stores answer
//! asynchronously.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::base::clock::now_unix;
use crate::base::trace::TraceParent;
use crate::dataplane::approval::Answer;
use crate::dataplane::budget::{Admission, Budgets};
use crate::dataplane::denial::Denial;
use crate::dataplane::pipeline::{DAY_S, Decision, Outcome};
use crate::dataplane::shared::Shared;
use crate::dataplane::spend::{self, MAX_IN_FLIGHT, Refusal, Spend, Unit};
use crate::telemetry::audit::{Decided, Event};

/// How Envoy named the request, for the audit.
pub struct Asked<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// The full `:path` as the agent sent it.
    pub path: &'a str,
    /// The agent's `traceparent`, if it sent a valid one.
    pub trace: Option<TraceParent>,
}

/// Steps 6 to 8 for a request whose rules have decided, whichever Envoy API asked:
/// budgets, then metrics and the audit record.
pub async fn conclude(
    shared: &Shared,
    decision: &mut Decision,
    asked: &Asked<'_>,
    started: Instant,
) {
    // Budgets first: a looping agent is rate-limited before it reaches the desk.
    let near_cap = admit(&shared.budgets, &shared.spend, decision, asked.request_id).await;
    approve(shared, decision).await;
    inject_token(decision).await;
    if let Some(charge) = decision.charge.as_mut() {
        charge.trace = asked.trace;
    }
    let proxy = decision.subject.proxy.as_deref().unwrap_or_default();
    shared.metrics.record(proxy, decision.kind().as_str());
    if near_cap {
        shared.metrics.record_near_cap(proxy);
    }
    shared.metrics.observe_decision(started.elapsed());
    if let Outcome::Deny(denial) = &decision.outcome {
        tracing::info!(
            request_id = asked.request_id,
            proxy = decision.subject.proxy.as_deref(),
            credential = decision.subject.credential.as_deref(),
            decision = denial.kind().as_str(),
            "request denied"
        );
    }
    shared
        .audit
        .record(Event::Decided(decided(
            asked,
            decision,
            started.elapsed(),
            near_cap,
        )))
        .await;
}

/// The decision half of the request's audit record.
pub(crate) fn decided(
    asked: &Asked<'_>,
    decision: &Decision,
    elapsed: Duration,
    near_cap: bool,
) -> Decided {
    let subject = &decision.subject;
    let status = match &decision.outcome {
        Outcome::Deny(denial) => Some(denial.http_status()),
        Outcome::Forward(_) => None,
    };
    let kind = decision.kind().as_str();
    // Unrouted requests: what the client sent, query cut off, length bounded.
    let path = subject.path.clone().unwrap_or_else(|| {
        let raw = asked.path.split('?').next().unwrap_or_default();
        raw.chars().take(512).collect()
    });
    Decided {
        request_id: asked.request_id.to_owned(),
        time_ms: crate::base::clock::now_unix_ms(),
        elapsed_us: u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX),
        proxy: subject.proxy.clone(),
        target: subject.target.clone(),
        credential: subject.credential.clone(),
        key_id: subject.key_id.clone(),
        run_label: subject.run_label.clone(),
        method: asked.method.chars().take(32).collect(),
        path,
        status,
        decision: kind,
        rule_id: subject.rule_id.clone(),
        facts: subject.facts.clone(),
        trace: asked.trace,
        near_cap,
    }
}

/// Step 7, fetched credentials: the token goes in last, once the request is admitted.
async fn inject_token(decision: &mut Decision) {
    let (Outcome::Forward(forward), Some(source)) = (&mut decision.outcome, &decision.token) else {
        return;
    };
    match source.header().await {
        Ok(value) => forward
            .set
            .push((std::borrow::Cow::Borrowed("authorization"), value.to_vec())),
        Err(e) => {
            let proxy = decision.subject.proxy.clone().unwrap_or_default();
            tracing::warn!(proxy = %proxy, error = %e, "no upstream token; refusing the request");
            decision.outcome = Outcome::Deny(Denial::CredentialUnavailable(proxy));
        }
    }
}

/// Step 6, approval, once budgets admitted the request: a held request goes only once
/// approved, else it is refused with the approval's id, and what the budgets reserved for
/// it is handed back.
async fn approve(shared: &Shared, decision: &mut Decision) {
    let (Outcome::Forward(_), Some(ask)) = (&decision.outcome, &decision.approval) else {
        return;
    };
    let answer = match &shared.desk {
        Some(desk) => desk.ask(ask, crate::base::clock::now_unix_ms()).await,
        None => Err("this replica has no approval desk".to_owned()),
    };
    let denial = match answer {
        Ok(Answer::Approved) => return,
        Ok(Answer::Pending(id)) => Denial::ApprovalRequired {
            id: Arc::from(id),
            rule: ask.rule_id.clone(),
        },
        Ok(Answer::Denied(id)) => Denial::RuleDenied {
            id: ask.rule_id.clone(),
            notes: Some(Arc::from(format!("a person denied approval {id}"))),
        },
        Ok(Answer::Backlogged(n)) => Denial::ApprovalsBacklogged(n),
        Err(e) => {
            tracing::warn!(error = %e, "refusing a request held for approval");
            Denial::BudgetUnavailable
        }
    };
    if let Some(charge) = decision.charge.take()
        && charge.reserved > 0
        && let Err(e) = (shared.spend)
            .settle(
                &charge.accounts,
                charge.reserved,
                spend::Settlement::Charge(0),
                0,
            )
            .await
    {
        tracing::warn!(error = %e, "could not release a held request's reservation");
    }
    if let Some(duplicate) = decision.duplicate {
        shared.budgets.forget(duplicate.fingerprint).await;
    }
    decision.outcome = Outcome::Deny(denial);
}

/// Step 6, budgets: counts an allowed request against its limits, or refuses it. Apart
/// from the rest because a shared store answers asynchronously. Returns whether the
/// request left a spend account 80 % or more used.
pub(crate) async fn admit(
    budgets: &Budgets,
    spend: &Spend,
    decision: &mut Decision,
    request_id: &str,
) -> bool {
    if !matches!(decision.outcome, Outcome::Forward(_)) {
        return false;
    }
    // A repeat is refused before it counts against any budget.
    if let Some(duplicate) = decision.duplicate {
        match budgets
            .first_seen(duplicate.fingerprint, duplicate.window_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                decision.charge = None;
                decision.outcome = Outcome::Deny(Denial::DuplicateRequest {
                    window_s: duplicate.window_ms / 1000,
                });
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "refusing a guarded request");
                decision.charge = None;
                decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
                return false;
            }
        }
    }
    let near_cap = admit_budgets(budgets, spend, decision, request_id).await;
    if let (Some(duplicate), Outcome::Deny(_)) = (decision.duplicate, &decision.outcome) {
        // Refused by a budget, so never forwarded: sending it again is no repeat.
        budgets.forget(duplicate.fingerprint).await;
    }
    near_cap
}

/// Rate limits, then the spend reservation; whether an account is now 80 % used.
async fn admit_budgets(
    budgets: &Budgets,
    spend: &Spend,
    decision: &mut Decision,
    request_id: &str,
) -> bool {
    if !decision.limits.is_empty() {
        admit_rate(budgets, decision, request_id).await;
    }
    if let (Outcome::Forward(_), Some(charge)) = (&decision.outcome, &mut decision.charge) {
        let estimate = charge.cost.reservation();
        match spend.reserve(&charge.accounts, estimate).await {
            Ok(Ok(headroom)) => {
                charge.reserved = estimate;
                decision.shown.budget_left_usd = headroom.left.map(crate::base::money::to_usd);
                return headroom.near_cap;
            }
            Ok(Err(refusal)) => {
                let denial = match refusal {
                    Refusal::TooManyInFlight => Denial::TooManyInFlight(MAX_IN_FLIGHT),
                    Refusal::CapReached(i) => {
                        let account = &charge.accounts[i];
                        let what = account.describe();
                        // A key's lifetime cap never resets (a day is as good a hint as
                        // any); a period's does when the period ends.
                        let retry_after_s =
                            account.period.map_or(DAY_S as u64, |p| p.at(now_unix()).1);
                        match account.unit {
                            Unit::Micros => Denial::SpendCapExceeded {
                                what,
                                retry_after_s,
                            },
                            Unit::Tokens => Denial::TokensSpent {
                                what,
                                retry_after_s,
                            },
                        }
                    }
                };
                decision.charge = None;
                decision.outcome = Outcome::Deny(denial);
            }
            Err(e) => {
                tracing::warn!(error = %e, "refusing a priced request");
                decision.charge = None;
                decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
            }
        }
    }
    false
}

async fn admit_rate(budgets: &Budgets, decision: &mut Decision, request_id: &str) {
    // Asked to retry (the retry headers are what asks Envoy), its retries count too.
    let retriable = matches!(&decision.outcome, Outcome::Forward(f)
        if f.set.iter().any(|(name, _)| name == "x-envoy-max-retries"));
    let retriable = retriable.then_some(request_id);
    match budgets.admit_retriable(&decision.limits, retriable).await {
        Ok(Admission::Admitted { limit, remaining }) => {
            decision.shown.rate = Some((limit, remaining));
        }
        Ok(Admission::Refused {
            limit,
            retry_after_ms,
        }) => {
            decision.outcome = Outcome::Deny(Denial::RateLimited {
                limit,
                retry_after_s: retry_after_ms.div_ceil(1000).max(1),
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing a limited request");
            decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
        }
    }
}
