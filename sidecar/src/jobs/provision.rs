//! Organizations' Polar customers: create the team customer of a new
//! organization (or find it, when Polar says its external_id is taken), and
//! push a changed name or email to it. Paused while Polar is unavailable;
//! a claim left unreported comes back when its lease ends.
use std::sync::Arc;
use tokio::sync::watch;

use super::{JobError, Jobs};
use crate::polar::client::OrgCustomer;
use crate::polar::{Answer, Failure};
use crate::store::customers;

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
        let orgs = customers::claim_provisioning(&jobs.pool, 20, jobs.s.lease).await?;
        if orgs.is_empty() {
            return Ok(done);
        }
        for o in orgs {
            let id = &o.org_id;
            jobs.budget.acquire().await?;
            let action = if o.update { "update" } else { "create" };
            let answer = match (o.update, o.polar_customer_id.as_deref()) {
                (true, Some(cid)) => {
                    match polar
                        .update_customer(cid, &o.name, o.email.as_deref())
                        .await
                    {
                        Answer::Ok(r) => Answer::Ok(r.map(|()| cid.to_string())),
                        Answer::RateLimited(d) => Answer::RateLimited(d),
                        Answer::Failed(f) => Answer::Failed(f),
                    }
                }
                _ => {
                    polar
                        .create_customer(&OrgCustomer {
                            id,
                            name: &o.name,
                            email: o.email.as_deref(),
                            owner_email: o.owner_email.as_deref(),
                            owner_name: o.owner_name.as_deref(),
                            owner_external_id: o.owner_external_id.as_deref(),
                        })
                        .await
                }
            };
            let pool = &jobs.pool;
            match answer {
                Answer::Ok(Ok(cid)) => {
                    jobs.health.success();
                    if o.update {
                        customers::customer_synced(pool, id, o.customer_version).await?;
                        tracing::info!(organization_id = %id, polar_customer_id = %cid, "Polar customer updated");
                    } else {
                        customers::customer_provisioned(pool, id, &cid).await?;
                        tracing::info!(organization_id = %id, polar_customer_id = %cid, "Polar customer provisioned");
                    }
                    done += 1;
                }
                Answer::Ok(Err(err)) => {
                    jobs.health.success();
                    customers::provisioning_failed(pool, id, &err).await?;
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
                    customers::provisioning_failed(pool, id, &cause).await?;
                    tracing::warn!(organization_id = %id, action, error = %cause, "creating or updating the Polar customer failed");
                }
            }
        }
    }
}
