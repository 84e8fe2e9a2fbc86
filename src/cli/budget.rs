//! The store budget as the command line keeps it: the size asked for, what eviction did,
//! and what `gc --dry-run` would do.

use super::*;

/// The budget: --max-store-size (or $BUX_FUSE_MAX_STORE_SIZE), else the store's setting.
pub(super) fn budget(store: &Store, given: Option<&str>) -> Result<Option<u64>> {
    if let Some(s) = given.filter(|s| !s.trim().is_empty()) {
        return crate::store::parse_size(s).map(Some).map_err(|e| {
            anyhow::anyhow!("--max-store-size (or ${}): {e}", crate::store::BUDGET_ENV)
        });
    }
    Ok(store.settings()?.max_store_size)
}

/// Keeps the store within `budget` (if any), `protect` kept whatever it costs.
pub(super) fn apply_budget(
    store: &Store,
    budget: Option<u64>,
    protect: &[String],
    quiet: bool,
) -> Result<()> {
    if let Some(max) = budget {
        let r = store.enforce_budget(max, protect)?;
        report_budget(&r, quiet);
    }
    Ok(())
}

pub(super) fn report_budget(r: &crate::store::BudgetReport, quiet: bool) {
    if !quiet && (!r.removed.is_empty() || !r.dropped.is_empty()) {
        let mut what = Vec::new();
        if !r.removed.is_empty() {
            what.push(format!("removed {}", r.removed.join(", ")));
        }
        if !r.dropped.is_empty() {
            what.push(format!(
                "dropped the fetched chunks of {}",
                r.dropped.join(", ")
            ));
        }
        eprintln!(
            "store budget {}: {}; {} now",
            human(r.max),
            what.join("; "),
            human(r.after)
        );
    }
    report_over(r);
}

/// One line when the budget cannot be met: by how much, and what mounts hold.
pub(super) fn report_over(r: &crate::store::BudgetReport) {
    if let Some(over) = r.over {
        eprintln!(
            "warning: the store ({}) is {} over its budget of {}: {} of it is held by live mounts{} \
             or the image in use; kept",
            human(r.after),
            human(over),
            human(r.max),
            human(r.held),
            match r.mounted.is_empty() {
                true => String::new(),
                false => format!(" ({})", r.mounted.join(", ")),
            }
        );
    }
}

/// `gc --dry-run`: what gc would remove.
pub(super) fn gc_dry_run(store: &Store, budget: Option<u64>) -> Result<()> {
    let plan = store.budget_plan(budget.unwrap_or(u64::MAX), &[])?;
    println!(
        "would remove {} that nothing refers to",
        human(plan.unreferenced)
    );
    for s in &plan.steps {
        let verb = match s.action {
            crate::store::BudgetAction::Remove => "would remove image",
            crate::store::BudgetAction::DropChunks => "would drop the fetched chunks of",
        };
        println!(
            "{verb} {} ({}, last used {})",
            s.reference,
            human(s.bytes),
            ago(s.last_used)
        );
    }
    match budget {
        Some(max) => {
            println!(
                "store {} -> {} (budget {})",
                human(plan.total),
                human(plan.after),
                human(max)
            );
            if plan.after > max {
                println!(
                    "the budget cannot be met: {} over, {} held by live mounts{}",
                    human(plan.after - max),
                    human(plan.held),
                    match plan.mounted.is_empty() {
                        true => String::new(),
                        false => format!(" ({})", plan.mounted.join(", ")),
                    }
                );
            }
        }
        None => println!(
            "store {} -> {} (no budget)",
            human(plan.total),
            human(plan.after)
        ),
    }
    Ok(())
}
