//! `tms-gateway alarms`: the alarm list from the command line.

use anyhow::{Context, Result};
use tms_config::Config;
use tms_gateway::open_parts;
use tms_model::SharedClock;
use tms_registry::views;

/// `tms-gateway alarms`: every device's alarms, as a table or as the API's JSON.
pub(super) async fn alarms(
    config: Config,
    state: &str,
    json: bool,
    limit: i64,
    clock: &SharedClock,
) -> Result<()> {
    let (store, _) = open_parts(&config, clock).await?;
    let filter = tms_store::AlarmFilter {
        active: match state {
            "active" => Some(true),
            "cleared" => Some(false),
            _ => None,
        },
        limit,
        ..Default::default()
    };
    let result = store.alarms(&filter).await.context("listing alarms");
    store.close().await;
    let alarms = result?;
    if json {
        let list: Vec<_> = alarms.iter().map(views::alarm).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<20} {:<18} {:<9} {:<8} {:<26} {:<26} ACKNOWLEDGED BY",
        "ID", "SERIAL", "CODE", "SEVERITY", "STATE", "RAISED", "CLEARED"
    );
    for a in &alarms {
        let raised = views::time(Some(a.raised_at));
        let cleared = views::time(a.cleared_at);
        println!(
            "{:<8} {:<20} {:<18} {:<9} {:<8} {:<26} {:<26} {}",
            a.id,
            a.serial,
            a.code,
            a.severity,
            if a.cleared_at.is_some() {
                "cleared"
            } else {
                "active"
            },
            raised.as_str().unwrap_or("-"),
            cleared.as_str().unwrap_or("-"),
            a.acknowledged_by.as_deref().unwrap_or("-"),
        );
    }
    println!("{} alarm(s)", alarms.len());
    Ok(())
}
