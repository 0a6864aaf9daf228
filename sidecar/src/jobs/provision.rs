//! Organizations' Polar customers: create the team customer of a new
//! organization (or find it, when Polar says its external_id is taken), and
//! push a changed name or email to it. Paused while Polar is unavailable;
//! a claim left unreported comes back when its lease ends.
use std::sync::Arc;
use tokio::sync::watch;

use super::{JobError, Jobs};
use crate::polar::client::OrgCustomer;
use crate::polar::{Answer, Failure};

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = provision_due(&jobs).await {
            tracing::warn!(error = %e, "provisioning customers failed");
        }
        if !jobs
            .wait(&jobs.wake.provision, jobs.s.poll, &mut stop)
            .await
        {
            return;
        }
    }
}

/// Works every due organization; returns how many now have a customer (or
/// an up-to-date one).
pub async fn provision_due(jobs: &Jobs) -> Result<usize, JobError> {
    let polar = jobs
        .polar
        .as_ref()
        .expect("provisioning runs with a Polar client");
    let mut done = 0;
    loop {
        if jobs.health.is_paused() {
            return Ok(done);
        }
        let orgs = {
            let c = jobs.pool.get().await?;
            c.query(
                "SELECT org_id, action, polar_customer_id, name, email, owner_email, owner_name, owner_external_id,
                        customer_version
                 FROM meter.claim_provisioning(20, $1::text::interval)",
                &[&jobs.lease_text()],
            )
            .await?
        };
        if orgs.is_empty() {
            return Ok(done);
        }
        for o in orgs {
            let (id, action, customer): (String, String, Option<String>) =
                (o.get(0), o.get(1), o.get(2));
            let (name, email): (String, Option<String>) = (o.get(3), o.get(4));
            let (owner_email, owner_name, owner_ext): (
                Option<String>,
                Option<String>,
                Option<String>,
            ) = (o.get(5), o.get(6), o.get(7));
            let version: i32 = o.get(8);
            jobs.budget.acquire().await?;
            let answer = match (action.as_str(), customer.as_deref()) {
                ("update", Some(cid)) => {
                    match polar.update_customer(cid, &name, email.as_deref()).await {
                        Answer::Ok(r) => Answer::Ok(r.map(|()| cid.to_string())),
                        Answer::RateLimited(d) => Answer::RateLimited(d),
                        Answer::Failed(f) => Answer::Failed(f),
                    }
                }
                _ => {
                    polar
                        .create_customer(&OrgCustomer {
                            id: &id,
                            name: &name,
                            email: email.as_deref(),
                            owner_email: owner_email.as_deref(),
                            owner_name: owner_name.as_deref(),
                            owner_external_id: owner_ext.as_deref(),
                        })
                        .await
                }
            };
            let c = jobs.pool.get().await?;
            match answer {
                Answer::Ok(Ok(cid)) => {
                    jobs.health.success();
                    if action == "update" {
                        c.query_one("SELECT meter.customer_synced($1, $2)", &[&id, &version])
                            .await?;
                        tracing::info!(organization_id = %id, polar_customer_id = %cid, "Polar customer updated");
                    } else {
                        c.query_one("SELECT meter.customer_provisioned($1, $2)", &[&id, &cid])
                            .await?;
                        tracing::info!(organization_id = %id, polar_customer_id = %cid, "Polar customer provisioned");
                    }
                    done += 1;
                }
                Answer::Ok(Err(err)) => {
                    jobs.health.success();
                    c.query_one("SELECT meter.provisioning_failed($1, $2)", &[&id, &err])
                        .await?;
                    tracing::warn!(organization_id = %id, action, error = %err, "Polar refused the customer");
                }
                Answer::RateLimited(wait) => {
                    jobs.health.success();
                    jobs.budget.pause(wait).await?;
                }
                Answer::Failed(Failure::Systemic(cause)) => {
                    if jobs.health.systemic(&cause) {
                        tracing::error!(cause = %cause, "Polar is unavailable: provisioning paused");
                        jobs.wake.probe.notify_one();
                    }
                    return Ok(done);
                }
                Answer::Failed(Failure::Transient(cause) | Failure::TooLarge(cause)) => {
                    if jobs.polar_wide(&cause).await {
                        return Ok(done);
                    }
                    c.query_one("SELECT meter.provisioning_failed($1, $2)", &[&id, &cause])
                        .await?;
                    tracing::warn!(organization_id = %id, action, error = %cause, "creating or updating the Polar customer failed");
                }
            }
        }
    }
}
