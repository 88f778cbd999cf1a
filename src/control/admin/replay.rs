//! `Replay`: what a draft policy would decide differently on the requests the audit
//! recorded. Each record is judged on the facts the audit keeps — its proxy, credential,
//! method and path, and the headers and query parameters its rules read then
//! (`dataplane::facts`) — by the draft's rules, as `latchkey check` would judge it;
//! records those facts cannot settle (a rule on a value not kept, or on the body; a
//! request refused before its rules) are counted as unjudged, by why.
//! Records are read a page at a time, so a million of them never sit in memory.

use std::collections::BTreeMap;

use tonic::Status;

use super::AdminService;
use super::wire::{internal, material, store_status};
use crate::dataplane::denial::{Kind, Stage};
use crate::dataplane::facts::Recorded;
use crate::dataplane::pipeline::{Caller, Judgement, RequestView, decide_as};
use crate::dataplane::rules::Body;
use crate::dataplane::snapshot::Policy;
use crate::pb::{ReplayChange, ReplayRequest, ReplayResponse, Unjudged};
use crate::policy::PolicyFile;
use crate::store::Desired;
use crate::store::requests::{self, Entry, Filter};

const BODY: &str = "a rule judges the body, which the audit does not keep";
const UNKEPT: &str =
    "a rule reads a header or query parameter whose value the audit did not keep for the request";

/// Changes listed at most; all are counted.
const MAX_LISTED: usize = 10_000;
const PAGE: u32 = 1_000;

/// How one record fares.
#[derive(Debug, PartialEq)]
enum Verdict {
    Judged {
        was: String,
        now: String,
        rule_id: Option<String>,
    },
    Unjudged(&'static str),
}

impl AdminService {
    pub(super) async fn replay_draft(&self, req: ReplayRequest) -> Result<ReplayResponse, Status> {
        let file = PolicyFile::parse(&req.policy_yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (secrets, keys) = material(req.secrets, req.keys)?;
        let desired = Desired::new(&file, secrets, keys).map_err(Status::invalid_argument)?;
        let draft = self.draft(desired).await?;
        let filter = Filter {
            proxy: (!req.proxy.is_empty()).then_some(req.proxy),
            since_ms: (req.since_ms > 0).then_some(req.since_ms),
            ..Filter::default()
        };
        let mut out = ReplayResponse::default();
        let mut unjudged: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut cursor = None;
        let now_ms = crate::base::clock::now_unix_ms();
        loop {
            let page = requests::scan(&self.store, &filter, PAGE, cursor)
                .await
                .map_err(store_status)?;
            for entry in &page {
                match judge(&draft, entry, now_ms) {
                    Verdict::Unjudged(why) => *unjudged.entry(why).or_default() += 1,
                    Verdict::Judged { was, now, rule_id } => {
                        out.judged += 1;
                        if was == now {
                            continue;
                        }
                        out.changed_total += 1;
                        if out.changed.len() < MAX_LISTED {
                            out.changed.push(ReplayChange {
                                request_id: entry.request_id.clone(),
                                time_ms: entry.time_ms,
                                proxy: entry.proxy.clone().unwrap_or_default(),
                                credential: entry.credential.clone().unwrap_or_default(),
                                method: entry.method.clone(),
                                path: entry.path.clone(),
                                was,
                                now,
                                rule_id: rule_id.unwrap_or_default(),
                            });
                        }
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => cursor = Some(last.seq),
                _ => break,
            }
        }
        out.unjudged = unjudged.values().sum();
        out.unjudged_reasons = unjudged
            .into_iter()
            .map(|(reason, count)| Unjudged {
                reason: reason.to_owned(),
                count,
            })
            .collect();
        Ok(out)
    }

    /// The draft compiled as an apply would compile it, in a transaction rolled back:
    /// nothing changes.
    async fn draft(&self, desired: Desired) -> Result<Policy, Status> {
        let server = self.sync.secrets().current();
        let mut compiled = None;
        self.store
            .edit(
                &self.master,
                true,
                |_| Ok::<_, Status>(desired),
                |after| {
                    let policy = Policy::compile(after, &self.master, &server)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    compiled = Some(policy);
                    Ok(())
                },
            )
            .await
            .map_err(internal)??;
        compiled.ok_or_else(|| Status::internal("the draft did not compile"))
    }
}

/// The decision types a record's rules account for; `allow` for one its rules let
/// through, whatever refused it later (a budget, a guard, the vendor's credential).
fn was(entry: &Entry) -> Result<&str, &'static str> {
    match Kind::parse(&entry.decision).map(Kind::stage) {
        Some(Stage::Rules) => Ok(&entry.decision),
        Some(Stage::Key) => Err("refused for its key, before any rule"),
        Some(Stage::Path) => Err("refused for its path, before any rule"),
        Some(Stage::After) | None => Ok("allow"),
    }
}

fn judge(draft: &Policy, entry: &Entry, now_ms: i64) -> Verdict {
    let was = match was(entry) {
        Ok(was) => was.to_owned(),
        Err(why) => return Verdict::Unjudged(why),
    };
    let (Some(proxy), Some(credential)) = (&entry.proxy, &entry.credential) else {
        return Verdict::Unjudged("no proxy or credential recorded");
    };
    let Some(index) = draft.credential_index(credential) else {
        // Its keys would be unknown to the draft.
        return Verdict::Judged {
            was,
            now: "invalid_key".to_owned(),
            rule_id: None,
        };
    };
    // A rule the request may meet that reads headers or the query is judged on what the
    // audit kept of them; one reading a value it did not keep (withheld, or read by no
    // rule when the request was made) could decide either way.
    let lists = [
        Some(draft.credential_rules(index)),
        draft.proxy(proxy).map(|p| &p.rules),
    ];
    let kept = (entry.facts.as_deref())
        .and_then(Recorded::parse)
        .unwrap_or_default();
    let covered = (lists.into_iter().flatten())
        .flat_map(|l| l.may_meet(&entry.method, &entry.path))
        .all(|r| kept.covers(r.reads()));
    if !covered {
        return Verdict::Unjudged(UNKEPT);
    }
    let headers = kept.header_pairs();
    let query = kept.query_string();
    let path = match query.as_str() {
        "" => format!("/{proxy}{}", entry.path),
        query => format!("/{proxy}{}?{query}", entry.path),
    };
    let view = RequestView {
        method: &entry.method,
        path: &path,
        headers: &headers,
        // An empty body for what fingerprints or prices it; for the rules, the body
        // fields kept, else `Unread`, so a rule that judges the body says it cannot.
        body: Some(b""),
    };
    let body = kept.body_json().map_or(Body::Unread, Body::Json);
    match decide_as(draft, &view, &body, Caller::Credential(credential), now_ms) {
        Judgement::NeedBody(_) => Verdict::Unjudged(BODY),
        Judgement::Decided(decision) => {
            let rule_id = decision.subject.rule_id.as_deref().map(str::to_owned);
            let now = match &decision.approval {
                // Held for a person: a record of the same rule that went (approved) is
                // the same decision.
                Some(ask)
                    if !(was == "allow" && entry.rule_id.as_deref() == Some(&ask.rule_id)) =>
                {
                    "approval_required".to_owned()
                }
                _ => decision.kind().as_str().to_owned(),
            };
            Verdict::Judged { was, now, rule_id }
        }
    }
}
